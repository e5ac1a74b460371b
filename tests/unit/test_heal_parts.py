"""修复的训练顺序：token 数多于文本时按轮次重复，每轮重新打乱、每个窗口各出现一次。"""

import torch

from patcher.heal import HealOptions, epoch_order


def test_epoch_order_repeats_the_text_in_reshuffled_epochs():
    order = epoch_order(10, HealOptions(tokens=25 * 64, seq_len=64))
    assert len(order) == 25
    for epoch in (order[:10], order[10:20]):
        assert sorted(epoch.tolist()) == list(range(10))
    assert len(set(order[20:].tolist())) == 5
    assert not torch.equal(order[:10], order[10:20])  # a new shuffle each epoch


def test_epoch_order_covers_a_text_longer_than_the_budget_once():
    order = epoch_order(40, HealOptions(tokens=64, seq_len=64))
    assert sorted(order.tolist()) == list(range(40))
