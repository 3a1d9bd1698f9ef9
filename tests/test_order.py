import numpy as np

from fasttrain.data.order import EpochOrder


def test_training_order_depends_on_seed_and_epoch_only():
    a, b = EpochOrder(100, 10, True, seed=3), EpochOrder(100, 10, True, seed=3, start_epoch=2)
    first, second = a.next_epoch(), a.next_epoch()
    assert not np.array_equal(first, second)
    assert np.array_equal(b.next_epoch(), second)  # a run resumed at epoch 2 sees epoch 2's order
    assert sorted(first.tolist()) == list(range(100))


def test_a_resumed_epoch_starts_at_its_step():
    full = EpochOrder(100, 10, True, seed=0, start_epoch=4).next_epoch()
    resumed = EpochOrder(100, 10, True, seed=0, start_epoch=4, start_step=3).next_epoch()
    assert np.array_equal(resumed, full[30:])


def test_shards_see_disjoint_equal_whole_batches():
    parts = [EpochOrder(103, 10, True, seed=0, shard_id=k, num_shards=3).next_epoch() for k in range(3)]
    assert [len(p) for p in parts] == [30, 30, 30]
    assert len(set(np.concatenate(parts).tolist())) == 90
    val = [EpochOrder(103, 10, False, seed=0, shard_id=k, num_shards=3).next_epoch() for k in range(3)]
    assert np.concatenate(val).tolist() == list(range(103))  # evaluation: everything once, in order


def test_excluded_samples_leave_later_epochs():
    order = EpochOrder(20, 5, True, seed=0)
    order.excluded.update({3, 7})
    assert not {3, 7} & set(order.next_epoch().tolist())
    assert order.steps() == 3
