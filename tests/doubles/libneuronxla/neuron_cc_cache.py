"""TEST DOUBLE of `libneuronxla.neuron_cc_cache` (written by us): the names optimum-neuron imports.
Exports run with --disable_neuron_cache, so none of them is used."""

from typing import Any


class CacheUrl:
    def __init__(self, url: str = "", url_type: str = "fs") -> None:
        self.url, self.url_type = url, url_type

    @classmethod
    def get_cache_url(cls, cache_dir: Any = None) -> "CacheUrl":
        return cls(str(cache_dir or ""), "fs")


class CompileCache:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("TEST DOUBLE: libneuronxla compile cache")


class CompileCacheFs(CompileCache):
    pass


class CompileCacheS3(CompileCache):
    pass


def create_compile_cache(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("TEST DOUBLE: libneuronxla compile cache")
