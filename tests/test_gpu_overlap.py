"""The communication stream and two micro-batches on one CUDA GPU (every dispatcher at ep_size 1):

- an exchange runs on the communication stream (its handle names it, its event is a CUDA event) and gives
  the right rows;
- `after=` orders it: hidden states still being written on another stream (behind a long GPU sleep) are
  read only once that stream's event has passed;
- `comm_sms` bounds the symm transfer kernels' grid and the layer stays right;
- a layer with two micro-batches and shared experts, captured in a CUDA graph with a capacity, replays
  bit-equal to the eager forward, which matches the oracle.
"""
import pytest
import torch

from epmoe import MoEConfig, MoELayer, contract, make_dispatcher, reference_moe
from epmoe.testing import assert_close, capture, load_experts, random_experts, random_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = dict(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
M = 64


def _here() -> list[str]:
    return [n for n, cls in contract.DISPATCHERS.items()
            if cls.CAPS.communicates and contract.dispatcher_problem(n, None, 1, "cuda") is None]


def _routing(cfg, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k] for _ in range(T)]).to(torch.int32)
    return ids.cuda(), torch.rand(T, cfg.top_k, generator=g).cuda()


def _identity(batch):
    if hasattr(batch, "local_ids"):
        return (batch.x.float() * (batch.weights * (batch.local_ids >= 0)).sum(1, keepdim=True)).to(batch.x.dtype)
    return batch.x.clone()


@pytest.mark.parametrize("name", _here())
def test_exchanges_run_on_the_communication_stream(name):
    cfg = MoEConfig(**CFG)
    d = make_dispatcher(name, cfg, device="cuda", max_tokens_per_rank=M)
    assert d.use_comm_stream == (not d.plan.host_sync)      # the default: in order where the host reads sizes
    d.use_comm_stream = True        # the mechanism, also where the default runs in order
    x = torch.randn(40, cfg.hidden_size, device="cuda").to(cfg.dtype)
    ids, w = _routing(cfg, 40)
    pending = d.dispatch_async(x, ids, w)
    assert pending.overlaps and isinstance(pending.event, torch.cuda.Event)
    batch, handle = pending.wait()
    assert handle.stream is d.comm_stream.stream and handle.stream != torch.cuda.current_stream()
    out = d.combine_async(_identity(batch), handle).wait()
    assert_close(out, x.double() * w.double().sum(1, keepdim=True), 1e-2)


@pytest.mark.parametrize("name", _here())
def test_after_orders_the_exchange_behind_another_stream(name):
    cfg = MoEConfig(**CFG)
    d = make_dispatcher(name, cfg, device="cuda", max_tokens_per_rank=M)
    values = torch.randn(32, cfg.hidden_size, device="cuda").to(cfg.dtype)
    ids, w = _routing(cfg, 32, seed=1)
    x = torch.zeros_like(values)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)          # tens of ms: the exchange would read zeros if it did not wait
        x.copy_(values)
        written = side.record_event()
    batch, handle = d.dispatch_async(x, ids, w, after=written).wait()
    out = d.combine(_identity(batch), handle)
    assert_close(out, values.double() * w.double().sum(1, keepdim=True), 1e-2)


@pytest.mark.parametrize("name", [n for n in _here() if contract.dispatcher_class(n).CAPS.bounded_sms])
def test_transfer_kernels_on_a_few_sms(name):
    cfg = MoEConfig(**CFG)
    experts = random_experts(cfg, seed=2)
    layer = MoELayer(cfg, dispatcher=name, device="cuda", max_tokens_per_rank=M, comm_sms=2)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, 50, seed=3, device="cuda")
    assert_close(layer(x, logits), reference_moe(x.cpu(), logits.cpu(), experts, cfg))


@pytest.mark.parametrize("name", [n for n in ["local"] + _here()
                                  if contract.dispatcher_class(n).CAPS.cuda_graph_safe])
def test_two_micro_batches_with_shared_experts_replay_bit_equal(name):
    cfg = MoEConfig(**CFG)
    experts = random_experts(cfg, seed=4)
    layer = MoELayer(cfg, dispatcher=name, device="cuda", max_tokens_per_rank=M, micro_batches=2)
    load_experts(layer, experts)
    shared_w = (torch.randn(cfg.hidden_size, cfg.hidden_size, device="cuda") / 16).to(cfg.dtype)

    def shared(h):
        return h @ shared_w
    xs, ls = random_inputs(cfg, 37, seed=5, device="cuda")
    with torch.no_grad():
        replay, out = capture(lambda: layer(xs, ls, shared_experts=shared))
        for seed in (6, 7, 8):
            x, logits = random_inputs(cfg, 37, seed=seed, device="cuda")
            xs.copy_(x)
            ls.copy_(logits)
            replay()
            eager = layer(x, logits, shared_experts=shared)
            assert torch.equal(out, eager), (out.float() - eager.float()).abs().max()
            routed = layer(x, logits)
            assert_close(routed, reference_moe(x.cpu(), logits.cpu(), experts, cfg))
    check = getattr(layer.dispatcher, "check", None)
    if check is not None:
        check()
