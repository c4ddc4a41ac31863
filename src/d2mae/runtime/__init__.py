"""Infrastructure under every other part: the one exception type, files and atomic writes, devices and precision,
seeds, stop signals, several processes, logs, and config dataclasses (with every option's domain)."""
