"""Isolate which cuSPARSELt call faults on this machine: each step in its own process."""
import subprocess, sys
steps = {
 "compress": "p=torch._cslt_compress(a); torch.cuda.synchronize()",
 "mm": "p=torch._cslt_compress(a); c=torch._cslt_sparse_mm(p,b); torch.cuda.synchronize(); print(float((c.float()-(a.float()@b.float())).abs().max()))",
 "mm_T": "p=torch._cslt_compress(a); c=torch._cslt_sparse_mm(p,b,None,transpose_result=True); torch.cuda.synchronize(); print(c.shape)",
 "search": "p=torch._cslt_compress(a); print(torch._C._cusparselt.mm_search(p,b,None,None,None,False)); torch.cuda.synchronize()",
 "search_alg": "p=torch._cslt_compress(a); r=torch._C._cusparselt.mm_search(p,b,None,None,None,False); c=torch._cslt_sparse_mm(p,b,alg_id=r[0]); torch.cuda.synchronize(); print(r)",
 "semi": "from torch.sparse import to_sparse_semi_structured, SparseSemiStructuredTensor; SparseSemiStructuredTensor._FORCE_CUTLASS=False; s=to_sparse_semi_structured(a); c=torch.mm(s,b); torch.cuda.synchronize(); print('ok')",
 "version": "print(torch.backends.cusparselt.version(), torch.backends.cusparselt.is_available())",
}
pre = ("import torch; from sparsecnn.passes.masks import mask_2to4; "
       "a=torch.randn(256,256,device='cuda',dtype=torch.float16); a=a*mask_2to4(a,1); b=torch.randn(256,128,device='cuda',dtype=torch.float16); ")
for name, code in steps.items():
    r = subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, env={**__import__('os').environ, "CUDA_LAUNCH_BLOCKING": "1"})
    tail = (r.stdout + r.stderr).strip().splitlines()
    print(f"{name:<11} rc={r.returncode} {' | '.join(tail[-2:])[:300]}")
