"""Development and demo tooling, not needed on a production node: synthetic plates with the real JUMP key names
(`synth`; every cpg0016 microscope layout with its load_data: `synth_layouts`), moto's S3 server on loopback (`locals3`), a `prefetchd serve` subprocess for tests and benchmarks
(`daemon_process`) and `prefetchd demo` (`demo`). Needs the `dev` extra: `pip install 'prefetchd[dev]'`."""
