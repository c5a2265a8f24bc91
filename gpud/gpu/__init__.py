"""GPUs: the inventory (NVML or static) with health samples, and the scheduler that leases them."""
