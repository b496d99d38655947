"""adam4bit: the 4-bit codecs (tables, quantiser, bounds, packing), the step against an independent transcription
and torchao, exact state bytes, bit-exact weights_only resume with uint8 codes, and tracking fp32 AdamW."""
import copy

import pytest
import torch

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes
from memtrain.optim.quant4 import (BlockCodec, Rank1Codec, linear_table, pack, quantize, rounding_thresholds,
                                  signed_de_table, unpack)

from ..conftest import checkpoint_roundtrip, lm_batch, tiny_llama

try:
    import torchao.optim.quant_utils as ao_quant
    from torchao.optim.adam import single_param_adam as ao_single_param_adam
    from torchao.optim.subclass_4bit import OptimState4bit, get_qmap_signed, get_qmap_unsigned
    TORCHAO = None
except Exception as e:  # noqa: BLE001 - any import failure means: no parity reference here
    TORCHAO = f"torchao is not importable here ({type(e).__name__}: {e}); pip install torchao (test-only)"

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core runner (pytest -n 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_torchao = pytest.mark.skipif(TORCHAO is not None, reason=TORCHAO or "")
DE_DECIMALS = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0,
               0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]


def _data(n=65536, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4


# -- codecs -----------------------------------------------------------------------------------------------
def test_code_tables():
    de = signed_de_table()
    assert de.dtype == torch.float32 and de.numel() == 16
    torch.testing.assert_close(de, torch.tensor(DE_DECIMALS), rtol=0, atol=1e-7)
    assert torch.equal(linear_table(), torch.arange(1, 17, dtype=torch.float32) / 16)


@needs_torchao
def test_tables_and_quantiser_equal_torchao_bitwise():
    assert torch.equal(signed_de_table(), torch.tensor(get_qmap_signed()))
    assert not torch.equal(signed_de_table(), torch.tensor(DE_DECIMALS))  # the literals are off by one ulp
    assert torch.equal(linear_table(), torch.tensor(get_qmap_unsigned()))
    x = _data()
    for table, values in ((signed_de_table(), x), (linear_table(), x.square())):
        ours = BlockCodec(table, 128).encode(values)
        scaled, scale = ao_quant.scale_tensor(values, 128)
        codes = ao_quant.quantize_4bit_with_qmap(scaled, table)
        assert torch.equal(ours["scale"], scale)
        assert torch.equal(unpack(ours["codes"], values.numel()), codes)


def test_round_trip_error_bounds():
    x = _data()
    m = BlockCodec(signed_de_table(), 128)
    scale = m.encode(x)["scale"].repeat_interleave(128)
    err = ((m.decode(m.encode(x), x.shape) - x).abs() / scale).max()
    assert err <= 0.1125 + 1e-6
    minus_one = torch.tensor([-1.0, 0.5])
    assert m.decode(m.encode(minus_one), minus_one.shape)[0].item() == pytest.approx(-0.8875, abs=1e-7)

    v = x.square()
    lin = BlockCodec(linear_table(), 128)
    s = lin.encode(v)["scale"].repeat_interleave(128)
    back = lin.decode(lin.encode(v), v.shape)
    assert ((back - v).abs() / s).max() <= 0.0625
    assert (back / s).min() == 0.0625  # never zero: small second moments are over-estimated, not zeroed


def test_rank1_quantiser():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(300, 200, generator=g).square() * torch.rand(300, 1, generator=g) * torch.rand(1, 200, generator=g)
    codec = Rank1Codec(linear_table())
    fields = codec.encode(v)
    assert torch.equal(fields["row"], v.amax(dim=1, keepdim=True)) and fields["row"].shape == (300, 1)
    assert torch.equal(fields["col"], v.amax(dim=0, keepdim=True)) and fields["col"].shape == (1, 200)
    s = torch.minimum(fields["row"], fields["col"])
    z = v / s
    assert z.min() >= 0 and z.max() <= 1
    back = codec.decode(fields, v.shape)
    assert (back >= s / 16).all()
    assert ((back - v).abs() <= s / 16).all()
    assert fields["codes"].dtype == torch.uint8 and fields["codes"].shape == (300, 100)


def test_packing_round_trip_and_byte_order():
    assert pack(torch.tensor([3, 12], dtype=torch.uint8)).item() == 0x3C
    for n in (7, 8):
        codes = torch.randint(0, 16, (5, n), dtype=torch.uint8)
        packed = pack(codes)
        assert packed.shape == (5, (n + 1) // 2)
        assert torch.equal(unpack(packed, n), codes)


def test_quantize_ties_go_to_the_larger_code():
    table = linear_table()
    mid = (table[3] + table[4]) / 2
    z = torch.stack([mid, torch.nextafter(mid, torch.tensor(0.0)), torch.tensor(0.0), torch.tensor(2.0)])
    assert quantize(z, rounding_thresholds(table)).tolist() == [4, 3, 0, 15]
    # the decision points reproduce the element-wise test `z - T[k] >= (T[k+1] - T[k]) / 2` exactly
    for tab in (table, signed_de_table()):
        t = rounding_thresholds(tab)
        down, up = tab[:-1], tab[1:]
        assert ((t - down) >= (up - down) * 0.5).all()
        before = torch.nextafter(t, torch.full_like(t, -1.0))
        assert ((before - down) < (up - down) * 0.5).all()


def test_row_aligned_blocks_with_a_short_last_block():
    x = torch.randn(3, 200)
    codec = BlockCodec(signed_de_table(), 128)
    fields = codec.encode(x)
    assert fields["scale"].shape == (3, 2) and fields["codes"].shape == (3, 100)
    assert torch.equal(fields["scale"][:, 1], x[:, 128:].abs().amax(dim=1))
    assert ((codec.decode(fields, x.shape) - x).abs()
            <= (0.1125 + 1e-6) * fields["scale"].repeat_interleave(128, 1)[:, :200]).all()


# -- the optimizer ----------------------------------------------------------------------------------------
def _nearest(z, table):
    """Independent nearest-code search: argmin distance, ties to the larger code (search from the top)."""
    d = (z.unsqueeze(-1) - table).abs()
    flipped = d.flip(-1)
    return (table.numel() - 1 - flipped.argmin(dim=-1)).to(torch.uint8)


def _naive_adam4bit(w, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Straightforward transcription of docs/optimizers/adam4bit.md, Design, for one [m, n] tensor (rank-1 v, n % 128 ==
    0).

    The second moment uses torch AdamW's ``β2·V + (1−β2)·G²`` (memtrain's shared AdamW kernel) rather than the
    spec's lerp (they differ by an ulp)."""
    b1, b2 = betas
    lin = torch.arange(1, 17) / 16
    de = signed_de_table()  # the binding fp32 table (the decimals differ by one ulp)
    m_hat = torch.zeros_like(w)
    v_hat = torch.zeros_like(w)
    for t, g in enumerate(grads, 1):
        w = w * (1 - lr * wd)
        m = torch.lerp(m_hat, g, 1 - b1)
        v = b2 * v_hat + ((1 - b2) * g) * g
        w = w - (lr / (1 - b1**t)) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
        blocks = m.reshape(m.shape[0], -1, 128)
        s = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        m_hat = (de[_nearest(blocks / s, de).long()] * s).reshape(m.shape)
        s = torch.minimum(v.amax(1, keepdim=True), v.amax(0, keepdim=True)).clamp(min=1e-12)
        v_hat = lin[_nearest(v / s, lin).long()] * s
    return w, m_hat, v_hat


def test_steps_equal_an_independent_transcription():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 256, generator=g) * 0.02
    grads = [torch.randn(64, 256, generator=g) * 1e-3 for _ in range(4)]
    w = torch.nn.Parameter(start.clone())
    opt = memtrain.build_optimizer([w], "adam4bit", lr=1e-3, weight_decay=0.01)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
    ref_w, ref_m, ref_v = _naive_adam4bit(start, grads, 1e-3, 0.01)
    torch.testing.assert_close(w.detach(), ref_w, rtol=0, atol=2e-7)
    st = opt.state[w]
    assert st["step"] == 4 and set(st) == {"step", "m_codes", "m_scale", "v_codes", "v_row", "v_col"}
    from memtrain.optim.quant4 import BlockCodec as B, Rank1Codec as R
    m = B(signed_de_table(), 128).decode({"codes": st["m_codes"], "scale": st["m_scale"]}, w.shape)
    v = R(linear_table()).decode({"codes": st["v_codes"], "row": st["v_row"], "col": st["v_col"]}, w.shape)
    assert torch.equal(m, ref_m)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=0)  # same codes; the row/col maxima may differ by an ulp


@needs_torchao
def test_block_v_step_matches_torchao_adamw4bit():
    """torchao.optim.AdamW4bit's own step function and 4-bit state tensors, run eagerly (AdamW4bit wraps the same
    function in torch.compile, which costs ~30 s on this CPU)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(256, 512, generator=g) * 0.02
    grads = [torch.randn(256, 512, generator=g) * 1e-3 for _ in range(10)]
    w = torch.nn.Parameter(start.clone())
    opt = memtrain.build_optimizer([w], "adam4bit", lr=1e-3, weight_decay=0.01, v_norm="block")
    ref = start.clone()
    ao_m = OptimState4bit.zeros(ref.shape, signed=True, block_size=128)
    ao_v = OptimState4bit.zeros(ref.shape, signed=False, block_size=128)
    step = torch.tensor(0.0)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        step += 1
        ao_single_param_adam(ref, grad, step, ao_m, ao_v, None, torch.tensor(1e-3), 0.9, 0.999, 0.01, 1e-8,
                             True, False)
    st = opt.state[w]
    assert torch.equal(st["m_codes"].reshape(-1), ao_m.codes)  # the first-moment path is bitwise torchao's
    assert torch.equal(st["m_scale"].reshape(-1), ao_m.scale)
    # The second moment: torchao updates V with lerp, memtrain's shared AdamW kernel with torch AdamW's
    # mul/addcmul. They differ by an ulp, which flips a code at an exact tie about once in 10^6 entries; a flipped
    # v code moves its entry by ≤ 1/16 of the block scale for one step. Everything else is within 2e-7.
    assert (st["v_codes"].reshape(-1) != ao_v.codes).float().mean() <= 1e-4
    diff = (w.detach() - ref).abs()
    assert (diff > 2e-7).float().mean() <= 1e-4 and diff.max() <= 1e-4
    assert (w.detach() - start).abs().max() > 5e-3  # total update 1.2e-2


def test_threshold_and_state_bytes():
    big = torch.nn.Parameter(torch.zeros(64, 64))  # 4096 elements: quantised
    small = torch.nn.Parameter(torch.zeros(4095))  # not
    opt = memtrain.build_optimizer([big, small], "adam4bit", lr=1e-3)
    big.grad, small.grad = torch.randn(64, 64), torch.randn(4095)
    opt.step()
    assert opt.state[big]["m_codes"].dtype == torch.uint8 and "exp_avg" not in opt.state[big]
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}

    w = torch.nn.Parameter(torch.zeros(2048, 2048))
    opt = memtrain.build_optimizer([w], "adam4bit", lr=1e-3)
    w.grad = torch.randn(2048, 2048)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * (2048 * 1024) + 4 * 2048 * 16 + 4 * (2048 + 2048) == 4_341_760
    assert optimizer_state_bytes(opt) / w.numel() <= 1.1  # 1.035 B/param
    block = memtrain.build_optimizer([w], "adam4bit", lr=1e-3, v_norm="block")
    block.step()
    assert optimizer_state_bytes(block) / w.numel() == 1.0625

    # Shapes that do not fill their last block: only the real codes are stored (no padded bytes kept alive).
    odd = torch.nn.Parameter(torch.zeros(33, 201))
    flat = torch.nn.Parameter(torch.zeros(4101))
    opt = memtrain.build_optimizer([odd, flat], "adam4bit", lr=1e-3)
    odd.grad, flat.grad = torch.randn(33, 201), torch.randn(4101)
    opt.step()
    assert optimizer_state_bytes(opt) == (2 * 33 * 101 + 4 * 33 * 2 + 4 * (33 + 201)  # rank-1 v
                                          + 2 * 2051 + 8 * 33)  # 1-D: block v, 33 blocks of 128


def test_keep_fp32_opt_out_by_name():
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "adam4bit", lr=1e-3, threshold=1024, keep_fp32=r"embed_tokens")
    model(**lm_batch(0)).loss.backward()
    opt.step()
    emb = model.model.embed_tokens.weight
    assert "exp_avg" in opt.state[emb] and "m_codes" in opt.state[model.lm_head.weight]
    # keep_fp32 on a bare parameter list is refused: tests/optim_table.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weights_only_resume_is_bitwise_and_keeps_uint8_codes(dtype):
    kw = dict(lr=3e-3, weight_decay=0.01, threshold=1024)  # quantise the tiny model's matrices

    def steps(model, opt, start, n):
        for s in range(start, start + n):
            model(**lm_batch(s)).loss.backward()
            opt.step()
            opt.zero_grad()

    ref_model = tiny_llama(dtype=dtype)
    ref = memtrain.build_optimizer(ref_model, "adam4bit", **kw)
    steps(ref_model, ref, 0, 6)
    model = tiny_llama(dtype=dtype)
    opt = memtrain.build_optimizer(model, "adam4bit", **kw)
    steps(model, opt, 0, 3)
    ckpt = checkpoint_roundtrip(model, opt)
    resumed_model = tiny_llama(seed=5, dtype=dtype)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = memtrain.build_optimizer(resumed_model, "adam4bit", **kw)
    resumed.load_state_dict(ckpt["optim"])
    quantised = [s for s in resumed.state.values() if "m_codes" in s]
    assert len(quantised) >= 10
    for s in quantised:
        assert s["m_codes"].dtype == s["v_codes"].dtype == torch.uint8
        assert s["m_scale"].dtype == s["v_row"].dtype == s["v_col"].dtype == torch.float32
    steps(resumed_model, resumed, 3, 3)
    for (n, a), b in zip(resumed_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_tracks_fp32_adamw_on_tiny_llama_over_200_steps():
    """Final loss within 2% of fp32 AdamW after 200 steps on the embedded corpus, with every matrix quantised.

    The corpus' cached 4096-token tokenisation is reused with ids ≥ 511 folded into one id, so that the model (and
    the test) stays small."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memtrain.recipes.data import build_lm_data

    data = build_lm_data("shakespeare", seq_len=32, max_train_samples=1600)
    ids = torch.tensor(data.train["input_ids"]).clamp(max=511)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=512, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    start = LlamaForCausalLM(config)
    losses = {}
    for name in ("adamw", "adam4bit"):
        model = copy.deepcopy(start)
        opt = memtrain.build_optimizer(model, name, lr=3e-3, weight_decay=0.0)
        if name == "adam4bit":
            matrices = [p for g in opt.param_groups if g["role"] != "vector" for p in g["params"]]
            assert all(p.numel() >= 4096 for p in matrices)  # every matrix really is quantised
        tail = []
        for step in range(200):
            batch = ids[(step * 8) % len(ids):][:8]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step >= 190:
                tail.append(loss.item())
        losses[name] = sum(tail) / len(tail)
    assert losses["adamw"] < 5.0  # it learned (ln 512 = 6.2 at the start)
    assert abs(losses["adam4bit"] - losses["adamw"]) / losses["adamw"] < 0.02, losses
