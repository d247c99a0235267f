"""TrafficCamNet's architecture: DetectNet_v2 on a ResNet-18 backbone.

NVIDIA's TrafficCamNet (TAO, DetectNet_v2) reads a 3x544x960 image scaled by 1/255 and
predicts, on a 34x60 grid (stride 16), a coverage map per class (sigmoid) and four box
coordinates per class. The backbone is ResNet-18 with layer4 at stride 1, which is what
keeps the output stride at 16.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

TRAFFICCAMNET_CLASSES = ("car", "bicycle", "person", "road_sign")


class DetectNetV2(nn.Module):
    def __init__(self, num_classes: int = len(TRAFFICCAMNET_CLASSES)):
        super().__init__()
        backbone = resnet18()
        # layer4 at stride 1: the first block's strided conv and its shortcut become stride 1.
        backbone.layer4[0].conv1.stride = (1, 1)
        backbone.layer4[0].downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
        self.output_cov = nn.Conv2d(512, num_classes, kernel_size=1)
        self.output_bbox = nn.Conv2d(512, 4 * num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.sigmoid(self.output_cov(x)), self.output_bbox(x)
