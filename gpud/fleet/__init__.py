"""Fleet mode: several gpud hosts coordinated through etcd (imported only when GPUD_ETCD_ENDPOINTS is set)."""
