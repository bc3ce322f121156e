"""cpt: Configurable Preference Tuning as a batch job suite."""

import logging

__version__ = "0.1.0"


class _NoKernelsHint(logging.Filter):
    """bitsandbytes on CPUs with AVX512-BF16 tries the optional `kernels` hub package when
    it is imported (peft imports it) and, without it, warns "... `pip install kernels`" on
    every launch and in every worker. Its own CPU path is used instead and is what cpt
    needs (the hub is not reachable on clusters anyway), so only that hint is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pip install kernels" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHint())
