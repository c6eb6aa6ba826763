"""TLCR_MALLOC: the glibc settings a local Ray's workers start with (`tlcr_ray.local_ray.worker_malloc_env`)."""
import os
import platform

import pytest

from tlcr_ray.local_ray import RETAIN_HEAP_ENV, worker_malloc_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ["TLCR_MALLOC", "GLIBC_TUNABLES", *[n for n in os.environ if n.startswith("MALLOC_")]]:
        monkeypatch.delenv(name, raising=False)


def test_default_is_glibcs_own():
    assert worker_malloc_env() == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_retain_sets_the_heap_settings_unless_the_environment_has_its_own(monkeypatch):
    monkeypatch.setenv("TLCR_MALLOC", "retain")
    assert worker_malloc_env() == RETAIN_HEAP_ENV == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's own malloc settings win (the workers inherit them)
    assert worker_malloc_env() == {}


def test_unknown_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("TLCR_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="TLCR_MALLOC='jemalloc'"):
        worker_malloc_env()
