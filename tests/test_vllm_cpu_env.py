"""The CPU settings ctxsteer gives vLLM (server and benchmark peer alike): user settings win."""

from __future__ import annotations

from ctxsteer.server.engine.vllm.cpu_env import apply_cpu_defaults


def test_two_cores_are_both_bound_and_kv_space_is_fixed() -> None:
    env: dict[str, str] = {}
    apply_cpu_defaults(env, cores=[0, 1])
    assert env == {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "0,1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def test_larger_machines_keep_vllms_binding() -> None:
    env: dict[str, str] = {}
    apply_cpu_defaults(env, kv_space_gib=None, cores=list(range(16)))
    assert env == {}


def test_user_settings_win() -> None:
    env = {"VLLM_CPU_KVCACHE_SPACE": "12", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    apply_cpu_defaults(env, cores=[0, 1])
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "12", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
