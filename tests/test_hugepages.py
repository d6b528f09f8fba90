"""Large weights move into huge-page memory with the same values, layout and sharing; off when asked."""

import pytest
import torch
from torch import nn

from leanlm.errors import LeanlmError
from leanlm.model import hugepages as hp

needs_thp = pytest.mark.skipif(not hp.enabled(), reason="transparent huge pages are off here (or not Linux)")


@needs_thp
@pytest.mark.parametrize("column_major", [False, True])
def test_copy_keeps_values_and_layout(column_major):
    t = torch.randn(1024, 2048)
    if column_major:
        t = t.t().contiguous().t()
    new = hp.to_hugepages(t)
    assert new is not t
    assert new.data_ptr() % hp.HUGE_PAGE == 0
    assert new.stride() == t.stride() and new.shape == t.shape
    assert torch.equal(new, t)
    assert hp.to_hugepages(new) is new  # already placed: no second copy


def test_small_tensors_stay():
    m = nn.Linear(64, 64)
    ptr = m.weight.data_ptr()
    assert hp.place_in_hugepages(m) == 0 and m.weight.data_ptr() == ptr


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2048, 1024, bias=False)
        self.b = nn.Linear(2048, 1024, bias=False)
        self.b.weight = self.a.weight  # a shared parameter
        self.register_buffer("table", torch.randn(1024, 1024))
        self.inner = nn.Module()
        self.inner.register_buffer("table", self.table)  # a shared buffer


@needs_thp
def test_place_in_model_keeps_sharing_and_values():
    m = Tied()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert hp.place_in_hugepages(m) == 2
    assert m.b.weight is m.a.weight and m.inner.table is m.table
    # one region, 2 MiB aligned, holding both in module order
    assert m.table.data_ptr() % hp.HUGE_PAGE == 0
    assert m.a.weight.data_ptr() == m.table.data_ptr() + m.table.numel() * 4
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert hp.place_in_hugepages(m) == 0  # idempotent


def test_switch_off(monkeypatch):
    monkeypatch.setenv("LEANLM_HUGEPAGES", "0")
    m = Tied()
    ptr = m.a.weight.data_ptr()
    assert hp.place_in_hugepages(m) == 0 and m.a.weight.data_ptr() == ptr
    monkeypatch.setenv("LEANLM_HUGEPAGES", "no")
    with pytest.raises(LeanlmError, match="LEANLM_HUGEPAGES='no'"):
        hp.place_in_hugepages(m)
    assert m.a.weight.data_ptr() == ptr  # nothing moved


def test_thp_mode_parses_the_kernel_setting(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(hp, "_THP_SETTING", str(f))
    assert hp.thp_mode() == "madvise"
    f.write_text("always madvise [never]\n")
    assert hp.thp_mode() == "never" and not hp.enabled()
    monkeypatch.setattr(hp, "_THP_SETTING", str(tmp_path / "missing"))
    assert hp.thp_mode() is None and not hp.enabled()


@needs_thp
def test_prepare_decode_keeps_tokens(tiny_dirs):
    import leanlm
    from leanlm.decode.generate import generate_tokens

    m, _ = leanlm.load(tiny_dirs["llama"])
    ref = list(generate_tokens(m, [1, 2, 3], 12, eos_ids=set(), adapt_threads=False))
    m.prepare_decode()
    assert list(generate_tokens(m, [1, 2, 3], 12, eos_ids=set(), adapt_threads=False)) == ref
