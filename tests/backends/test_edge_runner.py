"""The C++ edge runner (``runner/``): TVM artifacts run with only the TVM runtime, natively and under qemu.

Checks, on the real stories260K model (README: its exact 256-token greedy text from BOS):
- the x86-64 runner on a ``cpu`` artifact prints that text, and the same ids as the Python TVM program;
- the aarch64 runner under ``qemu-aarch64`` on an ``arm64`` artifact prints the same ids (the CI check);
- the runner's llama2.c tokenizer encodes/decodes as ``llmpress.tokenizer`` does (tok512.bin, and the
  tinystories sentencepiece model converted by ``write_llama2c_tokenizer``);
- damaged or foreign artifacts are refused with a message naming the file.

Runner builds are cached in build/runner-<arch>/ (``llmpress.backends.tvm.emulate``). Tests skip only when the
build tools (cmake, a C++ compiler, for aarch64 the cross compiler and qemu-aarch64) are absent; CI installs them
with .ci/install-cross.sh.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmpress.backends.tvm import emulate

REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO / ".." / "shared").resolve()
S260 = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "models" / "tinystories-llama"

pytestmark = [pytest.mark.tvm]


def _need(arch: str) -> None:
    missing = emulate.missing_tools(arch)
    if missing:
        pytest.skip(f"the {arch} edge runner cannot be built/run here: missing {', '.join(missing)} "
                    "(.ci/install-cross.sh installs them)")


def _readme_text() -> str:
    text = (S260 / "README.md").read_text()
    return re.search(r"```\n(.*?)\n```", text, re.S).group(1)


# -- stories260K as an llmpress model ------------------------------------------------------------------------------
def _stories260k():
    """stories260K as (nn.Module, tokenizer), through llmpress's llama2.c loader."""
    from llmpress.ir.loaders import load_model

    loaded = load_model(S260 / "stories260K.bin")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def s260():
    if not S260.is_dir():
        pytest.fail(f"{S260} is missing (tests read the shared models from ../shared)")
    return _stories260k()


def _save(s260, target: str, folder: Path):
    import llmpress

    model, tok = s260
    art = llmpress.compile(model, target=target, tokenizer=tok, progress=False)
    art.save(folder)
    return art


@pytest.fixture(scope="module")
def cpu_artifact(s260, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge") / "s260-cpu"
    art = _save(s260, "cpu", folder)
    return folder, art


@pytest.fixture(scope="module")
def native_runner():
    _need(emulate.host_arch())
    return emulate.build_runner(emulate.host_arch())


# -- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_native_runner_prints_reference_greedy_text(native_runner, cpu_artifact):
    if emulate.host_arch() != "x86_64":
        pytest.skip("the cpu target builds x86-64 code; this host is " + emulate.host_arch())
    folder, art = cpu_artifact
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["payload"]["arch"] == "x86_64"
    res = emulate.run_artifact(folder, max_new_tokens=256)
    assert res.stdout.rstrip("\n") == _readme_text()
    assert "decode 255 tokens" in res.stderr  # BOS + 256 new ids, no early stop
    # A text prompt: the runner's ids equal the Python TVM program's greedy ids (same prompt encoding).
    prompt = "Lily and Ben went to the park"
    ids = emulate.run_artifact(folder, prompt=prompt, max_new_tokens=24, print_ids=True).ids
    expected = art.generate_ids(art.tokenizer.encode(prompt), max_new_tokens=24)
    assert ids == expected


@pytest.fixture(scope="module")
def aarch64_runner():
    """The aarch64 runner, cross-built (checked before any model is compiled, so a skip costs nothing)."""
    if emulate.host_arch() != "x86_64":
        pytest.skip("this check cross-runs aarch64 from an x86-64 host; this host is " + emulate.host_arch())
    _need("aarch64")
    return emulate.build_runner("aarch64")


@pytest.mark.slow
def test_arm64_artifact_under_qemu_matches_x86(aarch64_runner, native_runner, cpu_artifact, s260, tmp_path):
    """The CI check: the aarch64 runner, run by qemu-aarch64 on an arm64 artifact, prints the ids the x86-64
    runner prints for the cpu artifact of the same model (256 greedy tokens from BOS)."""
    arm = tmp_path / "s260-arm64"
    _save(s260, "arm64", arm)
    assert emulate.artifact_arch(arm) == "aarch64"
    assert b"llmpress_fgemv_neon" in (arm / "model.so").read_bytes()  # decode ran the NEON fp32 kernels
    cmd = emulate.runner_command("aarch64")
    assert cmd[0] == "qemu-aarch64"
    x86_ids = emulate.generate_ids(cpu_artifact[0], [1], max_new_tokens=256)
    arm_res = emulate.run_artifact(arm, prompt_ids=[1], max_new_tokens=256, print_ids=True)
    assert arm_res.command[0] == "qemu-aarch64" and "llmpress-runner: aarch64" in arm_res.stderr
    assert len(x86_ids) == 257
    assert arm_res.ids == x86_ids
    # What `llmpress run DIR --emulate` prints: the text, decoded by the aarch64 runner.
    text = emulate.run_emulated(arm, max_new_tokens=40)
    assert len(text) > 100 and _readme_text().startswith(text)


def _runner_tokenize(runner: Path, tok: Path, *args: str) -> bytes:
    proc = subprocess.run([str(runner), "--tokenizer", str(tok), *args], capture_output=True, check=True)
    return proc.stdout


PROMPTS = ["Once upon a time", "Lily's mom said, \"Let's go!\"", "a b  c", "über café 日本語 😀 ~{}", "x\ny\tz"]


def test_runner_tokenizer_matches_llama2c(native_runner):
    from llmpress.tokenizer import Llama2cTokenizer

    tok = Llama2cTokenizer(S260 / "tok512.bin")
    for text in PROMPTS:
        got = _runner_tokenize(native_runner, S260 / "tok512.bin", "--encode", text).split()
        assert [int(x) for x in got] == tok.encode(text, bos=False), text
    ids = tok.encode(" ".join(PROMPTS), bos=True) + [2, 1, 5, 6, 300]
    got = _runner_tokenize(native_runner, S260 / "tok512.bin", "--decode", ",".join(map(str, ids)))
    assert got.decode("utf-8") == tok.decode(ids)


def test_runner_tokenizer_matches_sentencepiece(native_runner, tmp_path):
    """A sentencepiece BPE model written in the llama2.c layout encodes (with whitespace normalization) and
    decodes like sentencepiece itself, byte fallback included."""
    from llmpress.backends.tvm.edge_tokenizer import edge_tokenizer_manifest
    from llmpress.tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(TINYSTORIES / "tokenizer.model")
    entries = edge_tokenizer_manifest(sp, tmp_path)
    assert entries["edge_tokenizer_normalize"] is True
    path = tmp_path / entries["edge_tokenizer"]
    paragraphs = [p for p in (SHARED / "data" / "tinystories" / "valid.txt").read_text().split("\n\n") if p][:20]
    for text in PROMPTS + [" padded  text ", *paragraphs]:
        got = _runner_tokenize(native_runner, path, "--encode", text, "--normalize").split()
        assert [int(x) for x in got] == sp.encode(text, bos=False), text[:60]
    ids = sp.encode(paragraphs[0]) + [3 + ord("\n"), 3 + 0xC3, 3 + 0xBC] + sp.encode(paragraphs[1])
    got = _runner_tokenize(native_runner, path, "--decode", ",".join(map(str, ids)))
    assert got.decode("utf-8") == sp.decode(ids)


@pytest.mark.slow
def test_runner_refuses_damaged_or_foreign_artifacts(native_runner, cpu_artifact, tmp_path):
    src = cpu_artifact[0]
    cmd = [str(native_runner)]

    def run(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(cmd + [str(folder), "--max-new-tokens", "2"], capture_output=True, text=True)

    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    w = flipped / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    res = run(flipped)
    assert res.returncode == 1 and "weights.safetensors: damaged (sha256" in res.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    lib = truncated / "model.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    res = run(truncated)
    assert res.returncode == 1 and "model.so: truncated or altered" in res.stderr

    foreign = tmp_path / "foreign"
    shutil.copytree(src, foreign)
    m = json.loads((foreign / "manifest.json").read_text())
    other = "aarch64" if emulate.host_arch() == "x86_64" else "x86_64"
    m["payload"]["arch"] = other
    (foreign / "manifest.json").write_text(json.dumps(m))
    res = run(foreign)
    assert res.returncode == 1 and f"built for {other}" in res.stderr

    res = subprocess.run(cmd + [str(src), "--prompt-ids", "1,9999"], capture_output=True, text=True)
    assert res.returncode == 1 and "outside the vocabulary of 512" in res.stderr


@pytest.mark.slow
def test_sentencepiece_artifact_runs_in_the_runner_like_python(native_runner, tmp_path):
    """A Hugging Face model's artifact (int4, sentencepiece tokenizer) carries the edge tokenizer; the C++ runner
    encodes the prompt and decodes the continuation as the Python program does."""
    import llmpress

    art = llmpress.compile(TINYSTORIES, pipeline="w4a16", target="cpu", progress=False)
    folder = art.save(tmp_path / "ts-w4")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["edge_tokenizer"] in manifest["files"]
    prompt = "once upon a time,  there was"  # a double space: sentencepiece's whitespace normalization applies
    want = art.generate(prompt, 24)
    assert emulate.run_emulated(folder, prompt=prompt, max_new_tokens=24) == want


def test_native_runner_runs_an_int8_kv_cache_artifact(native_runner, s260, tmp_path):
    """After ``kv_quant`` the calling convention holds int8 codes + float32 scales per cache (manifest
    ``lm.caches``): the runner allocates them from the manifest and prints the ids of the Python TVM program and of
    the reference graph (greedy from BOS, 64 tokens)."""
    import llmpress

    if emulate.host_arch() != "x86_64":
        pytest.skip("the cpu target builds x86-64 code; this host is " + emulate.host_arch())
    model, tok = s260
    module = llmpress.capture(model)
    art = llmpress.compile(module, pipeline="kv_quant", target="cpu", tokenizer=tok, progress=False)
    folder = tmp_path / "s260-kv8"
    art.save(folder)
    caches = json.loads((folder / "manifest.json").read_text())["lm"]["caches"]
    assert [(c["name"], c["dtype"]) for c in caches[:2]] == [("k_0", "int8"), ("k_0_scale", "float32")]
    assert len(caches) == 4 * module.lm.n_layers
    ids = emulate.generate_ids(folder, [1], max_new_tokens=64)
    assert len(ids) == 65
    assert ids == art.generate_ids([1], max_new_tokens=64)
    ref = llmpress.compile(module, pipeline="kv_quant", target="reference", progress=False)
    assert ids == ref.generate_ids([1], max_new_tokens=64)


def test_runner_stops_at_every_eos_id_like_python(native_runner, cpu_artifact, tmp_path):
    """``lm.eos_ids`` (config.json + generation_config.json) all end generation in the runner, as in Python: an
    artifact whose manifest names a token greedy decoding reaches early as a second EOS stops there in both."""
    import llmpress

    if emulate.host_arch() != "x86_64":
        pytest.skip("the cpu target builds x86-64 code; this host is " + emulate.host_arch())
    src, _ = cpu_artifact
    full = emulate.generate_ids(src, [1], max_new_tokens=32)
    assert len(full) == 33  # no stop in the first 32 tokens
    stop = full[8]
    cut = full.index(stop)  # its first occurrence ends generation
    folder = tmp_path / "two-eos"
    shutil.copytree(src, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["lm"]["eos_ids"] = [manifest["lm"]["eos_id"], stop]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    ids = emulate.generate_ids(folder, [1], max_new_tokens=32)
    assert ids == llmpress.load(folder).generate_ids([1], max_new_tokens=32)
    assert ids == full[:cut + 1]


# -- the other Hugging Face families (tests/families.py; the exact cpu builds are shared with test_cli_families) --
EDGE_PROMPT = "Lily and Ben went to the park"
# One TVM thread in the runner: on the shared 2-core test machines a 2-thread pool whose worker is descheduled spins
# at each parallel-for barrier (the suspected cause of one 700 s run of a test that takes seconds, at load 7-10).
ONE = {"threads": 1}


@pytest.mark.parametrize("kind", ["gpt2", "gemma2", "phi3"])
def test_native_runner_runs_other_families_like_python(native_runner, tmp_path_factory, kind):
    """GPT-2 (LayerNorm, learned positions read at ``start_pos``, 4 KV heads of 16), Gemma 2 (soft-capped scores
    and logits, sliding window, head_dim 32 with 2 KV heads) and Phi-3 (fused checkpoint weights): the runner
    allocates the caches the manifest lists, encodes the prompt with the artifact's edge tokenizer, and prints the
    greedy ids and text of the Python TVM program."""
    import llmpress

    from ..families import built

    if emulate.host_arch() != "x86_64":
        pytest.skip("the cpu target builds x86-64 code; this host is " + emulate.host_arch())
    folder = built(tmp_path_factory, kind, "exact", "cpu")
    art = llmpress.load(folder)
    prompt_ids = art.tokenizer.encode(EDGE_PROMPT)
    want = art.generate_ids(prompt_ids, max_new_tokens=16)
    assert len(want) == len(prompt_ids) + 16  # no early stop: every step is compared
    res = emulate.run_artifact(folder, prompt=EDGE_PROMPT, max_new_tokens=16, **ONE, print_ids=True)
    assert res.ids == want
    assert "decode 15 tokens" in res.stderr  # one prefill, then a decode call per token through the caches
    text = emulate.run_emulated(folder, prompt=EDGE_PROMPT, max_new_tokens=16, **ONE)
    assert text == art.generate(EDGE_PROMPT, 16)


@pytest.mark.slow
def test_arm64_gemma2_under_qemu_matches_x86(aarch64_runner, native_runner, tmp_path_factory):
    """One non-Llama family on aarch64: the Gemma 2 arm64 artifact, run by the aarch64 runner under qemu, prints
    the ids the x86-64 runner prints for its cpu artifact (few tokens: qemu is slow)."""
    from ..families import built

    x86 = built(tmp_path_factory, "gemma2", "exact", "cpu")
    arm = built(tmp_path_factory, "gemma2", "exact", "arm64")
    assert emulate.artifact_arch(arm) == "aarch64"
    res = emulate.run_artifact(arm, prompt=EDGE_PROMPT, max_new_tokens=8, **ONE, print_ids=True)
    assert res.command[0] == "qemu-aarch64" and "llmpress-runner: aarch64" in res.stderr
    want = emulate.run_artifact(x86, prompt=EDGE_PROMPT, max_new_tokens=8, **ONE, print_ids=True).ids
    assert len(want) == 12 + 8
    assert res.ids == want


def test_artifact_with_a_tokenizer_json_alone_saves_and_runs_on_ids(native_runner, tmp_path_factory, tmp_path,
                                                                   caplog):
    """GPT-2 and Qwen folders ship only a ``tokenizer.json`` (no sentencepiece model to write the llama2.c file
    from): a TVM artifact with such a tokenizer still saves (it used to fail with ConfigError at save), carries no
    edge tokenizer, and the runner generates Python's ids from ids. The gpt2 build is reused, re-saved with the
    reference model's tokenizer.json alone."""
    import logging

    import llmpress
    from llmpress.errors import ArtifactError
    from llmpress.tokenizer import HFTokenizer

    from ..families import built

    if emulate.host_arch() != "x86_64":
        pytest.skip("the cpu target builds x86-64 code; this host is " + emulate.host_arch())
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINYSTORIES / name, tok_dir / name)
    art = llmpress.load(built(tmp_path_factory, "gpt2", "exact", "cpu"))
    art.tokenizer = HFTokenizer(tok_dir / "tokenizer.json")
    # The loaded manifest still names the sentencepiece tokenizer's edge file; a fresh compile has no such entries.
    art.manifest = {k: v for k, v in art.manifest.items() if not k.startswith("edge_tokenizer")}
    with caplog.at_level(logging.WARNING, logger="llmpress.backends.tvm.edge_tokenizer"):
        folder = art.save(tmp_path / "gpt2-json-tok")
    assert "no llama2.c form" in caplog.text
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "edge_tokenizer" not in manifest and manifest["tokenizer"] == "tokenizer/tokenizer.json"
    ids = art.tokenizer.encode(EDGE_PROMPT)
    want = llmpress.load(folder).generate_ids(ids, max_new_tokens=8)
    assert len(want) == len(ids) + 8
    assert emulate.generate_ids(folder, ids, max_new_tokens=8, **ONE) == want
    with pytest.raises(ArtifactError, match="no llama2.c tokenizer; use --prompt-ids"):
        emulate.run_artifact(folder, prompt=EDGE_PROMPT, max_new_tokens=2, **ONE)


def test_runner_starts_a_model_without_bos_at_the_prompt(native_runner, tmp_path_factory, tmp_path):
    """Qwen configs say ``bos_token_id: null`` (``lm.bos_id`` -1): the runner encodes the prompt without a BOS in
    front (it used to put id -1 there and refuse it), and without a prompt says that one is needed. The gpt2 build
    with its manifest's BOS removed (the manifest is not among the hashed files)."""
    import llmpress
    from llmpress.errors import ArtifactError

    from ..families import built

    if emulate.host_arch() != "x86_64":
        pytest.skip("the cpu target builds x86-64 code; this host is " + emulate.host_arch())
    folder = tmp_path / "no-bos"
    shutil.copytree(built(tmp_path_factory, "gpt2", "exact", "cpu"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["lm"]["bos_id"] = -1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    art = llmpress.load(folder)
    ids = art.tokenizer.encode(EDGE_PROMPT, bos=False)
    res = emulate.run_artifact(folder, prompt=EDGE_PROMPT, max_new_tokens=8, **ONE, print_ids=True)
    assert res.ids == art.generate_ids(ids, max_new_tokens=8) and res.ids[:len(ids)] == ids
    with pytest.raises(ArtifactError, match="no BOS token"):
        emulate.run_artifact(folder, max_new_tokens=2, **ONE)
