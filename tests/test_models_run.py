"""`epmoe run --model PATH`: a tiny checkpoint with its tokenizer, greedy text on 1 and 2 ranks."""
import argparse

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from epmoe import contract  # noqa: E402
from epmoe.integration import run_model  # noqa: E402
from epmoe.integration.run_model import greedy_generate  # noqa: E402
from epmoe.integration.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer  # noqa: E402

PROMPT = "the capital of france is"
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model("mixtral", seed=41)
    directory = save_tiny_checkpoint(model, tmp_path_factory.mktemp("run") / "tiny-mixtral", max_shard_size="60KB")
    tok = tiny_tokenizer()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    new = greedy_generate(model, ids, NEW_TOKENS)[0].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return directory, tok.decode(new, skip_special_tokens=True)


def args_for(directory, **kw):
    base = dict(model=str(directory), ranks=1, prompt=PROMPT, max_new_tokens=NEW_TOKENS, dtype=None, device="cpu",
                experts="auto", dispatcher="auto")
    base.update(kw)
    return argparse.Namespace(**base)


def test_greedy_generate_equals_transformers_generate():
    model = tiny_model("qwen3_moe", seed=42)
    ids = torch.tensor([[1, 5, 9, 14]])
    want = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy_generate(model, ids, 6).tolist() == want[:, ids.shape[1]:].tolist()


def test_run_one_rank(checkpoint, capsys):
    directory, text = checkpoint
    assert run_model.main(args_for(directory)) == 0
    out = capsys.readouterr().out
    assert f"output: {text!r}" in out
    assert "tokens/s" in out and "expert memory" in out and "1.000" in out


@pytest.mark.skipif("alltoall" not in contract.DISPATCHERS, reason="the alltoall dispatcher is not registered")
def test_cli_run_two_ranks(checkpoint, capsys):
    from epmoe.cli import main as cli_main
    directory, text = checkpoint
    rc = cli_main(["run", "--model", str(directory), "--ranks", "2", "--prompt", PROMPT,
                   "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"output: {text!r}" in out
    assert "every rank generated the same tokens" in out
    assert out.count("0.500") == 2          # each rank holds half of the experts' memory


def test_run_argument_errors(checkpoint, tmp_path):
    directory, _ = checkpoint
    with pytest.raises(SystemExit, match="not a directory"):
        run_model.main(args_for(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="shrink a preset"):
        run_model.main(args_for(directory, experts=4))
    with pytest.raises(SystemExit, match="--dtype"):
        run_model.main(args_for(directory, dtype="int8"))
    with pytest.raises(SystemExit, match="--max-new-tokens"):
        run_model.main(args_for(directory, max_new_tokens=0))


def test_checkpoint_mistakes_are_named(tmp_path, checkpoint):
    """What a new user's directory may lack, said in the launching process with the fix."""
    import shutil

    from epmoe.integration import load_model
    directory, _ = checkpoint
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in directory.iterdir():
        if f.name in ("config.json",) or f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(SystemExit, match="has no tokenizer files"):
        run_model.main(args_for(bare))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit, match="model_type 'llama' has no MoE block epmoe converts"):
        run_model.main(args_for(llama))
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        load_model(tmp_path / "missing")
    shard = sorted(bare.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:20])          # an interrupted download
    with pytest.raises(ValueError, match=f"{shard.name}: not a readable safetensors file"):
        load_model(bare)
