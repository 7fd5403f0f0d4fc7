"""Scale-out pieces that need no extra devices: options, degree checks, the replicated page pool."""

from __future__ import annotations

import argparse

import pytest

from engine_jax.batch import EngineInputError
from engine_jax.config import ModelConfig
from engine_jax.kv_cache import OutOfPages, PagePool
from engine_jax.options import EngineOptions, add_arguments, build_engine
from engine_jax.replicas import ReplicatedPagePool
from engine_jax.sharding import ShardingError, check_degree, layout_kv_heads, make_mesh, valid_degrees

SMOLLM2 = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


def test_degrees_follow_the_heads():
    assert valid_degrees(SMOLLM2) == [1, 3]  # 9 does not divide the MLP's 1536
    with pytest.raises(ShardingError, match="2 does not divide the model's 9 query heads; this model can use 1, 3"):
        check_degree(SMOLLM2, 2)
    gqa = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=32, num_kv_heads=8, head_dim=2)
    assert layout_kv_heads(gqa, 4) == 8 and layout_kv_heads(gqa, 16) == 16  # KV heads repeated past 8
    odd = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=12, num_kv_heads=3, head_dim=2)
    with pytest.raises(ShardingError, match="3 KV heads can be neither split over 2 devices nor repeated"):
        check_degree(odd, 2)


def test_mesh_needs_the_devices():
    with pytest.raises(ShardingError, match="needs 64 devices"):
        make_mesh(64)


def test_options_from_flags_and_their_checks():
    """(pie-serve reads the same keys from its TOML file: tests/server/test_config.py.)"""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--tensor-parallel", "4", "--data-parallel", "2", "--kv-pages", "10"])
    assert EngineOptions.from_args(args) == EngineOptions(tensor_parallel=4, data_parallel=2, kv_pages=10)
    args = parser.parse_args(["--model", "m", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    options = EngineOptions.from_args(args)
    assert (options.model, options.num_processes, options.process_id) == ("m", 2, 1) and options.is_follower
    with pytest.raises(ValueError, match="--tensor-parallel must be an integer"):
        EngineOptions(tensor_parallel="2")
    with pytest.raises(ValueError, match="--num-processes > 1 needs --coordinator"):
        EngineOptions(num_processes=2)
    with pytest.raises(ValueError, match="--process-id 2 is outside 0..1"):
        EngineOptions(num_processes=2, coordinator="h:1", process_id=2)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        EngineOptions(num_processes=2, coordinator="nowhere")
    with pytest.raises(ValueError, match="--data-parallel cannot be combined with --num-processes"):
        EngineOptions(num_processes=2, coordinator="h:1", data_parallel=2)


def test_build_engine_says_how_many_devices_it_needs(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"--tensor-parallel 2 x --data-parallel 2 needs 4 devices; 1 cpu "
                                         r"device\(s\) available \(on CPU, XLA_FLAGS="):
        build_engine(EngineOptions(model=str(tiny_llama_dir), tensor_parallel=2, data_parallel=2))


def test_replicated_pool_places_by_near_and_splits_ids():
    pools = [PagePool(4), PagePool(4)]
    pool = ReplicatedPagePool(pools)
    assert pool.num_pages == 8 and pool.num_free == 8
    first = pool.alloc(3)  # the freest replica (a tie goes to 0)
    assert first == [0, 1, 2]
    second = pool.alloc(2)  # now replica 1 has more free pages
    assert second == [4, 5]
    assert pool.alloc(1, near=first[0]) == [3]
    with pytest.raises(OutOfPages, match="data-parallel replica 0: out of KV pages"):
        pool.alloc(1, near=first[0])
    assert pool.is_allocated(5) and not pool.is_allocated(6) and not pool.is_allocated(99)
    pool.free([5, 1])
    assert pools[0].num_free == 1 and pools[1].num_free == 3
    with pytest.raises(EngineInputError, match="page id 8 is out of range 0..7"):
        pool.free([8])
