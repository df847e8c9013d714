"""The converted model's forms agree: parallel = chunked continuation = token-by-token decode, for every
registered mixer and family; greedy generation equals the parallel argmax; every new parameter is
initialised (conversion starts from NaN); the window student equals the windowed teacher at
initialisation; padding is inert; the state's size does not depend on the context length."""

from __future__ import annotations

import pytest
import torch

from qwerky.modeling.mixer_base import get_mixer, mixer_names
from qwerky.modeling.state_cache import QwerkyState
from qwerky.surgery import convert_teacher
from qwerky_testing import tiny_teacher

FAMILIES = ["qwen2", "qwen3", "llama", "mistral"]
MIXERS = mixer_names()  # every registered student: a new mixer is tested here without an edit
WINDOW = {"window_size": 8, "num_sinks": 2}


def small(mixer: str) -> dict:
    """Options that make a windowed mixer's window short enough for these sequence lengths to pass it."""
    fields = {name for name, *_ in get_mixer(mixer).Options.describe()}
    return {k: v for k, v in WINDOW.items() if k in fields}


def _perturb(student: torch.nn.Module, scale: float = 0.05) -> None:
    """Make the new parameters matter (zero gates and the like), so form-equality tests can fail."""
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * scale)


def _token_by_token(student: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    state = student.init_state(x.shape[0])
    with torch.no_grad():
        return torch.cat([student(x[:, i:i + 1], past_key_values=state, use_cache=True).logits
                          for i in range(x.shape[1])], 1)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_parallel_equals_pieces_and_steps(family: str, mixer: str) -> None:
    torch.manual_seed(1)
    student = convert_teacher(tiny_teacher(family), mixer=mixer, mixer_options=small(mixer))
    _perturb(student)
    x = torch.randint(0, 384, (2, 45))
    with torch.no_grad():
        full = student(x).logits
        state = student.init_state(2)
        pieces = torch.cat([student(x[:, :17], past_key_values=state, use_cache=True).logits,
                            student(x[:, 17:], past_key_values=state, use_cache=True).logits], 1)
    steps = _token_by_token(student, x)
    _close(pieces, full)
    _close(steps, full)
    assert state.position.tolist() == [45, 45]


@pytest.mark.parametrize("family", FAMILIES)
def test_window_student_equals_windowed_teacher_at_init(family: str) -> None:
    teacher = tiny_teacher(family)
    W, S, T = 8, 2, 30
    student = convert_teacher(teacher, mixer="window", mixer_options={"window_size": W, "num_sinks": S})
    x = torch.randint(0, 384, (1, T))
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    allowed = (k <= q) & ((k < S) | (q - k < W))
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        ref = teacher(x, attention_mask=mask).logits  # the teacher itself, restricted by an explicit mask
        out = student(x).logits
        full_teacher = teacher(x).logits
    _close(out, ref, 1e-5)
    assert (out - full_teacher).abs().max() > 1e-3  # the window really cuts something at T > W


def test_left_padded_batch_equals_rows_alone() -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="rwkv6")
    a, b = torch.randint(1, 384, (1, 12)), torch.randint(1, 384, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        out = student(batch, attention_mask=mask, past_key_values=student.init_state(2), use_cache=True).logits
        ra, rb = student(a).logits, student(b).logits
    _close(out[0], ra[0])
    _close(out[1, 5:], rb[0])


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_new_parameter_is_initialised(mixer: str) -> None:
    """Surgery fills new parameters with NaN; `reset_new_parameters` must set every one of them."""
    student = convert_teacher(tiny_teacher("qwen3"), mixer=mixer, attention_layers=[1])
    bad = [n for n, p in student.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"{mixer}: parameters left uninitialised by reset_new_parameters: {bad}"
    with torch.no_grad():
        assert torch.isfinite(student(torch.randint(0, 384, (1, 20))).logits).all()


@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_generate_equals_parallel_argmax(mixer: str) -> None:
    torch.manual_seed(3)
    student = convert_teacher(tiny_teacher("qwen2"), mixer=mixer, mixer_options=small(mixer))
    _perturb(student)
    prompt = torch.randint(0, 384, (1, 7))
    with torch.no_grad():
        out = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                               pad_token_id=0)
        argmax = student(out).logits[:, prompt.shape[1] - 1:-1].argmax(-1)
    assert out.shape[1] == prompt.shape[1] + 24
    assert torch.equal(out[:, prompt.shape[1]:], argmax)


@pytest.mark.parametrize("mixer", MIXERS)
def test_state_size_independent_of_context(mixer: str) -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer=mixer)
    short, long = student.init_state(1), student.init_state(1)
    with torch.no_grad():
        student(torch.randint(0, 384, (1, 10)), past_key_values=short, use_cache=True)
        student(torch.randint(0, 384, (1, 1000)), past_key_values=long, use_cache=True)
    assert short.nbytes() == long.nbytes() > 0


def test_hybrid_attention_layers_grow_and_all_attention_equals_teacher() -> None:
    teacher = tiny_teacher("llama")
    student = convert_teacher(teacher, attention_layers=[0, 1])
    x = torch.randint(0, 384, (1, 20))
    with torch.no_grad():
        _close(student(x).logits, teacher(x).logits, 1e-5)
        state = student.init_state(1)
        steps = torch.cat([student(x[:, i:i + 1], past_key_values=state, use_cache=True).logits for i in range(20)], 1)
    _close(steps, teacher(x).logits, 1e-4)
    assert state.nbytes() > student.init_state(1).nbytes()  # a kept attention layer's cache grows


@pytest.mark.parametrize("mixer", MIXERS)
def test_state_select_and_stack_roundtrip(mixer: str) -> None:
    """Rows taken apart and stacked in another order continue as they were. The new parameters are perturbed
    (no zero-gated branch) and every row gets the same next token, so only the state tells the rows apart: a
    mixed-up row would show."""
    torch.manual_seed(0)
    student = convert_teacher(tiny_teacher("qwen2"), mixer=mixer, mixer_options=small(mixer))
    _perturb(student)
    x = torch.randint(0, 384, (3, 15))
    state = student.init_state(3)
    with torch.no_grad():
        student(x, past_key_values=state, use_cache=True)
        nxt = torch.full((3, 1), 7)
        ref = student(nxt, past_key_values=state.clone(), use_cache=True).logits
        parts = [state.select([i]) for i in (2, 0, 1)]
        merged = QwerkyState.stack(parts)
        out = student(nxt, past_key_values=merged, use_cache=True).logits
    assert (ref[0] - ref[1]).abs().max() > 1e-3 and (ref[1] - ref[2]).abs().max() > 1e-3  # rows differ by state
    _close(out, ref[[2, 0, 1]])


@pytest.mark.parametrize("window,sinks", [(16, 4), (16, 0)])
def test_blocked_window_attention_equals_one_block(window: int, sinks: int) -> None:
    from qwerky.modeling.ops_window import empty_cache, window_attention

    torch.manual_seed(0)
    B, T, H, Hk, D = 2, 150, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, D)
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, :7] = -1  # left padding on row 1
    pos[1, 7:] -= 7
    ref = window_attention(q, k, v, pos, 0.3, window, sinks, block=10**6)
    for block in (8, 33):
        _close(window_attention(q, k, v, pos, 0.3, window, sinks, block=block), ref, 1e-5)
    cache = empty_cache(B, Hk, D, window, sinks, torch.float32)
    parts = [window_attention(q[:, s], k[:, s], v[:, s], pos[:, s], 0.3, window, sinks, cache=cache, block=8)
             for s in (slice(0, 70), slice(70, T))]
    real = pos >= 0
    _close(torch.cat(parts, 1)[real], ref[real], 1e-5)


def test_window_cache_is_a_ring_of_the_last_positions() -> None:
    """Prefill, then one token at a time far past the window: the cache holds exactly the last W positions
    (position p in slot p % W), the sinks hold positions 0..S-1, and the keys are the ones written there;
    the per-token output equals the one-shot attention all along."""
    from qwerky.modeling.ops_window import empty_cache, window_attention

    torch.manual_seed(1)
    B, T, H, Hk, D, W, S = 2, 90, 2, 1, 4, 16, 3
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, D)
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, :5] = -1  # row 1: left padding, so its positions lag row 0's by 5
    pos[1, 5:] -= 5
    ref = window_attention(q, k, v, pos, 0.5, W, S)
    cache = empty_cache(B, Hk, D, W, S, torch.float32)
    outs = [window_attention(q[:, :10], k[:, :10], v[:, :10], pos[:, :10], 0.5, W, S, cache=cache)]
    for t in range(10, T):
        outs.append(window_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1], 0.5, W, S,
                                     cache=cache))
    real = pos >= 0
    _close(torch.cat(outs, 1)[real], ref[real], 1e-5)
    for row in range(B):
        last = int(pos[row, -1])
        want = torch.arange(last - W + 1, last + 1)
        assert sorted(cache["kpos"][row].tolist()) == want.tolist()
        assert cache["kpos"][row].tolist() == [int(want[(want % W) == s_][0]) for s_ in range(W)]
        col = {int(p_): i for i, p_ in enumerate(pos[row].tolist())}
        assert torch.equal(cache["k"][row], k[row, [col[int(p_)] for p_ in cache["kpos"][row]]])
        assert cache["spos"][row].tolist() == list(range(S))
        assert torch.equal(cache["sk"][row], k[row, [col[s_] for s_ in range(S)]])


@pytest.mark.parametrize("branch_rope,center", [(False, True), (True, False), (True, True)])
def test_window_branch_rope_option(branch_rope: bool, center: bool) -> None:
    """Without RoPE the branch's state holds no positions: the same tokens leave the same state whatever
    position they start at (with RoPE they do not). Either way the recurrent form equals the parallel one,
    and the branch's decays start from `branch_decay_init`."""
    torch.manual_seed(2)
    student = convert_teacher(tiny_teacher("qwen2"), mixer="window",
                              mixer_options={**WINDOW, "branch_rope": branch_rope, "branch_decay_init": [-9.0, -3.0],
                                             "branch_center_keys": center})
    mixer = student.mixers[0]
    assert (mixer.key_offset is not None) == center
    assert mixer.decay_base.min().item() == pytest.approx(-9.0) and mixer.decay_base.max().item() == pytest.approx(-3.0)
    _perturb(student)
    x = torch.randint(0, 384, (1, 30))
    steps = _token_by_token(student, x)
    with torch.no_grad():
        full = student(x).logits
        states = []
        for start in (0, 100):
            state = student.init_state(1)
            state.position.fill_(start)
            student(x, past_key_values=state, use_cache=True)
            states.append(state.layers[0]["S"])  # layer 0: same input (the embeddings) at either start
    _close(steps, full)
    same = torch.allclose(states[0], states[1], atol=1e-5)
    assert same != branch_rope


def test_window_options_roundtrip_and_legacy_configs(tmp_path) -> None:
    from qwerky.modeling.configuration_qwerky import QwerkyConfig

    student = convert_teacher(tiny_teacher("qwen2"), mixer="window",
                              mixer_options={"branch_rope": True, "branch_decay_init": [-8, -2]})
    student.config.save_pretrained(tmp_path)
    loaded = QwerkyConfig.from_pretrained(tmp_path)
    assert loaded.mixer_options == {"window_size": 64, "num_sinks": 4, "branch_rope": True,
                                    "branch_decay_init": [-8.0, -2.0], "branch_center_keys": True}
    # a config written before mixer_options: flat fields, and absent ones mean the defaults of that time
    old = {k: v for k, v in loaded.to_dict().items() if k != "mixer_options"}
    legacy = QwerkyConfig(**old, window_size=32, branch_rope=False)
    assert legacy.mixer_options == {"window_size": 32, "num_sinks": 4, "branch_rope": False,
                                    "branch_decay_init": [-5.0, 1.0], "branch_center_keys": False}
    rwkv = QwerkyConfig(**{**old, "mixer": "rwkv7"}, window_size=64, num_sinks=4)  # every old config had these
    assert rwkv.mixer_options == {}
    with pytest.raises(ValueError, match="removed from qwerky"):
        QwerkyConfig(**old, branch_own_qk=True)
    with pytest.raises(ValueError, match="mixer_options"):
        QwerkyConfig(**loaded.to_dict(), window_size=8)
    with pytest.raises(ValueError, match="branch_decay_init must be"):
        convert_teacher(tiny_teacher("qwen2"), mixer="window", mixer_options={"branch_decay_init": [1.0, -1.0]})
    with pytest.raises(ValueError, match="unknown option"):
        convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7", mixer_options={"window_size": 8})
    with pytest.raises(ValueError, match="choose one of"):
        convert_teacher(tiny_teacher("qwen2"), mixer="rwkv9")


def test_calibration_centres_the_branch_keys_and_keeps_the_start() -> None:
    """The offsets are the mean branch key of the sample, so the centred keys average to zero there; with
    the gate still at zero the student still equals the window baseline."""
    from qwerky.surgery import calibrate_mixers

    teacher = tiny_teacher("qwen3")  # q/k norms: the offset lives in the normed key space
    student = convert_teacher(teacher, mixer="window", mixer_options={**WINDOW, "branch_center_keys": True})
    x = torch.randint(0, 384, (3, 40))
    with torch.no_grad():
        before = student(x).logits
    assert calibrate_mixers(student, x) == len(student.mixers)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: inputs.__setitem__(mod.layer_idx, kw.get("hidden_states",
             a[0] if a else None)), with_kwargs=True) for m in student.mixers]
    with torch.no_grad():
        after = student(x).logits
        for m in student.mixers:
            _, k, _ = m._project(inputs[m.layer_idx], None)
            centred = k - m.key_offset.view(m.num_kv_heads, m.head_dim)
            assert m.key_offset.abs().max() > 1e-3
            assert centred.mean(dim=(0, 1)).abs().max() < 1e-4
    for h in hooks:
        h.remove()
    _close(after, before, 1e-6)
    assert calibrate_mixers(convert_teacher(teacher, mixer="rwkv7"), x) == 0  # nothing to calibrate
