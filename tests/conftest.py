"""Test-wide setup: 8 simulated CPU devices (set before JAX is imported) for the
multi-device tests; single-device code runs on device 0 as usual."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
