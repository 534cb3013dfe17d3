"""HF ``generate()`` (greedy, KV cache) through the exfx backend with the default (native) lowering."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import exfx

transformers = pytest.importorskip("transformers")

NEVER = exfx.Config(threshold=-float("inf"))


def _opt() -> torch.nn.Module:
    config = transformers.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    return transformers.OPTForCausalLM(config).eval()


def _relu_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu",
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.slow  # two tiny LMs, each compiled for prefill and decode (about 10 s)
@pytest.mark.parametrize("build", [_opt, _relu_llama], ids=["opt", "relu-llama-gqa"])
def test_generate_at_never_prune_equals_the_model_without_recompiles(build, monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("EXFX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EXFX_LOWERING", raising=False)  # the default lowering, as users get it
    torch.manual_seed(0)
    model = build()
    prompt = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=10, do_sample=False)
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        run = exfx.dynamo_backend.exfx_backend(gm, inputs, options={"config": NEVER.to_dict(), "inner": "eager"})
        graphs.append(run.exfx_graph)
        return run

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        short = model.generate(prompt, max_new_tokens=10, do_sample=False)
        after_short = len(graphs)
        model.generate(prompt, max_new_tokens=30, do_sample=False)
    torch._dynamo.reset()
    assert torch.equal(short, expected)
    assert len(graphs) == after_short  # no graph compiled per token once decoding is under way
    assert any(s.eligible for g in graphs for s in g.meta["exfx_report"].sites)  # the FFN sites were found
