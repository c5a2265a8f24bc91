"""gpuctl: the operator's CLI for gpud, over the admin Unix socket."""
