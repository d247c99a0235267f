"""The hybrid runtime: per layer the fastest correct implementation over every library."""
