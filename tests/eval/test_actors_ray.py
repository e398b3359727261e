"""Eval actors on a real local Ray cluster: sharded ranks equal the single-process computation,
bad input fails fast with a clear message, and a failing actor neither hangs nor lingers."""

import time

import numpy as np
import pytest

from ccrk_ray.eval.actors import ActorRanking, rank_galleries_on_actors, rank_on_actors, score_ranges_on_actors
from ccrk_ray.eval.nrccr import rank_split
from ccrk_ray.data.transforms import split_from_batch
from ccrk_ray.eval.retrieval import (Captions, ItmRescorer, SubsetRescorer, Task, encode_split, rank_sharded,
                                     score_ranges_sharded)
from tests.eval.test_retrieval import dense_ranks
from tests.eval.test_every_caption import assert_ranks_equal, multi_caption_gallery
from tests.eval.test_nrccr_eval import multi_caption_case
from tests.eval.test_sharded import planted_ties, toy_setup
from tests.eval.rescorers import Boom, ItmTable
from tests.eval.toy import ToyTwoStage
from tests.conftest import RAY

pytestmark = RAY


def rank_actors(state: str | None = "ALIVE"):
    """This cluster's RankActors in ``state`` (every one it ever created for None)."""
    import ray
    from ray.util.state import list_actors

    # our cluster's address: other Ray instances may be running on the machine
    filters = [("class_name", "=", "RankActor")] + ([("state", "=", state)] if state else [])
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, limit=10_000)


def alive_rank_actors():
    return rank_actors("ALIVE")


def test_actors_equal_dense_with_planted_ties(ray_local):
    img, txt = planted_ties()
    ref = dense_ranks(img, txt)
    stats = {}
    t2i, i2t = rank_on_actors(img, txt, num_actors=2, chunk=16, stats=stats).matrices()
    np.testing.assert_array_equal(t2i, ref[0])
    np.testing.assert_array_equal(i2t, ref[1])
    assert [(t.column, t.start, t.stop) for t in stats["tasks"]] == [(j, a, b) for j in range(3)
                                                                    for a, b in ((0, 32), (32, 70))]
    assert len(stats["actor_peak_rss_bytes"]) == 2
    assert all(b > 10 << 20 for b in stats["actor_peak_rss_bytes"])        # real processes were measured
    # more tasks than actors: the actors take the next task as they finish
    tasks = [Task(j, "t2i", a, b, 16) for j in range(3) for a, b in ((0, 16), (16, 48), (48, 64), (64, 70))]
    more = rank_on_actors(img, txt, num_actors=2, tasks=tasks).matrices()
    np.testing.assert_array_equal(more[0], ref[0])
    np.testing.assert_array_equal(more[1], ref[1])
    assert not alive_rank_actors()


def test_actors_equal_single_process_on_multi_caption_data(ray_local):
    """Several captions per image and language, images missing languages: ITC and two-stage."""
    img, caps = multi_caption_gallery(n=45, seed=5)
    rng = np.random.default_rng(2)
    itm = np.round(rng.normal(size=(len(caps.owner), len(img))), 1)
    rescore = ItmTable(itm)
    for kwargs in ({}, {"k_test": 7, "rescore": rescore}):
        want = rank_sharded(img, caps, **kwargs)
        got = rank_on_actors(img, caps, num_actors=2, chunk=16, **kwargs)
        for lang in caps.languages:
            for name in ("owner", "t2i", "i2t", "own"):
                np.testing.assert_array_equal(getattr(got.languages[lang], name), getattr(want.languages[lang], name))


def test_folds_rank_on_one_set_of_actors_as_galleries_of_their_own(ray_local):
    """COCO's 1K protocol on actors: the split and each fold (a gallery of its own, with its own
    slice of the ITM table) ranked by one set of actors started once, equal to ranking each fold
    alone in one process."""
    img, caps = multi_caption_gallery(n=45, seed=7)
    itm = np.round(np.random.default_rng(4).normal(size=(len(caps.owner), len(img))), 1)
    folds = [np.arange(0, 15), np.arange(15, 30), np.arange(30, 45)]
    for kwargs in ({}, {"k_test": 4, "rescore": ItmTable(itm)}):
        created = len(rank_actors(None))
        whole, *got = rank_galleries_on_actors(img, caps, [None, *folds], num_actors=2, chunk=8, **kwargs)
        assert len(rank_actors(None)) - created == 2
        want = rank_sharded(img, caps, **kwargs)
        assert_ranks_equal(whole, {lang: (r.t2i, r.i2t, r.own) for lang, r in want.languages.items()})
        for images, ranks in zip(folds, got):
            sub, index = caps.subset(images)
            rescore = {"rescore": SubsetRescorer(kwargs["rescore"], images, index)} if kwargs else {}
            want = rank_sharded(img[images], sub, **{**kwargs, **rescore})
            assert ranks.num_images == 15
            assert_ranks_equal(ranks, {lang: (r.t2i, r.i2t, r.own) for lang, r in want.languages.items()})
    with pytest.raises(ValueError, match="explicit tasks are the whole split's"):
        rank_galleries_on_actors(img, caps, [None, folds[0]], tasks=[Task(0, "t2i", 0, 10, 8)])


def test_nrccr_fused_ranking_on_actors_equals_in_process(ray_local):
    """Both passes on 2 actors (first: each matrix's range from its shards; second: the fused
    queries ranked like any others) give the in-process ranks exactly."""
    items, native, translated, owner = multi_caption_case(4, items=60)
    m = len(owner)
    pair = Captions(np.concatenate([native, translated]), np.r_[owner, owner], [0, m, 2 * m], ("native", "translated"))
    on_actors, here = score_ranges_on_actors(items, pair, num_actors=2, chunk=16), score_ranges_sharded(items, pair)
    assert on_actors.keys() == here.keys() == {"native", "translated"}
    for view in here:
        assert on_actors[view] == pytest.approx(here[view], abs=1e-12)
    want = rank_split(items, native, translated, owner, 0.4)
    got = rank_split(items, native, translated, owner, 0.4, ActorRanking(num_actors=2))
    for view in ("native", "translated", "fused"):
        for name in ("owner", "t2i", "i2t", "own"):
            np.testing.assert_array_equal(getattr(got.languages[view], name), getattr(want.languages[view], name))
    assert not alive_rank_actors()


def test_two_stage_on_actors_equals_in_process(ray_local):
    feats = encode_split(ToyTwoStage(), split_from_batch(toy_setup(), ["a", "b"]))
    rescore = ItmRescorer(ToyTwoStage(), feats["image_tokens"], feats["text_hidden"], feats["text_mask"])
    ref = rank_sharded(feats["image_emb"], feats["captions"], k_test=5, rescore=rescore).matrices()
    got = rank_on_actors(feats["image_emb"], feats["captions"], num_actors=2, chunk=16, k_test=5,
                         rescore=rescore).matrices()
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert (got[0] != rank_sharded(feats["image_emb"], feats["captions"]).matrices()[0]).any()    # ITM changed ranks


def test_actor_listing_sees_rank_actors(ray_local):
    """The checks below (none alive after clean-up, none created on bad input) would pass
    vacuously if the listing missed our actors, alive or stopped."""
    import ray

    from ccrk_ray.eval.actors import RankActor

    actor = ray.remote(RankActor).remote(np.zeros((2, 2)), Captions.one_per_image(np.zeros((2, 1, 2))), np.zeros(2))
    ray.get(actor.pid.remote())
    assert len(alive_rank_actors()) == 1
    ever = len(rank_actors(None))
    ray.kill(actor)
    deadline = time.monotonic() + 120
    while alive_rank_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_rank_actors() and len(rank_actors(None)) == ever     # a stopped actor stays listed


def test_bad_input_fails_fast_without_starting_actors(ray_local):
    img, txt = planted_ties()
    created = len(rank_actors(None))
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        rank_on_actors(img[:, :5], txt, num_actors=2)
    nan = txt.copy()
    nan[11, 0, 0] = np.nan
    with pytest.raises(ValueError, match="language 'en' hold 1 NaN/inf value.*image 11"):
        rank_on_actors(img, nan, languages=["en", "de", "fr"], num_actors=2)
    with pytest.raises(ValueError, match=r"query language\(s\) 'xx' not in the gallery"):
        rank_on_actors(img, txt, languages=["en", "de", "fr"], query_languages=["xx"], num_actors=2)
    def tasks(*bounds):
        return [Task(j, "t2i", a, b, 16) for j in range(3) for a, b in bounds]

    with pytest.raises(ValueError, match=r"task \[16, 16\) of 0 captions is empty"):
        rank_on_actors(img, txt, tasks=tasks((0, 16), (16, 16), (16, 70)), num_actors=2)
    with pytest.raises(ValueError, match="no tasks given"):
        rank_on_actors(img, txt, tasks=[], num_actors=2)
    with pytest.raises(ValueError, match="do not tile the 70 0 captions"):
        rank_on_actors(img, txt, tasks=tasks((0, 16), (32, 70)), num_actors=2)
    assert len(rank_actors(None)) == created        # bad input failed before any actor was created


def test_an_error_inside_an_actor_surfaces_and_stops_every_actor(ray_local):
    img, txt = planted_ties()
    # The error itself, not the hang guard's TimeoutError, must come back. The guard is far above
    # what a loaded machine needs to start two actors, so only a hang reaches it.
    with pytest.raises(ValueError, match=r"eval actor failed on \d (captions|images) \[\d+, \d+\): ITM features missing"):
        rank_on_actors(img, txt, num_actors=2, chunk=16, k_test=3, rescore=Boom(), timeout_s=600)
    deadline = time.monotonic() + 120           # ray.kill is asynchronous; a guard, not a race
    while alive_rank_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_rank_actors()


def test_eval_actors_start_ahead_only_where_the_embedding_keeps_its_cpus(ray_local, tmp_path):
    """``rank_pool_ahead`` starts the eval actors before the embedding only when the cluster (4
    CPUs) has room for both (one of each plus the read tasks: 3); the actors it started rank like
    any others and are stopped on exit. A model that fails to load while they wait is named."""
    import ray

    from ccrk_ray.eval.actors import RankPool, free_cpus
    from ccrk_ray.eval.evaluate import rank_pool_ahead

    img, txt = planted_ties()
    before = len(rank_actors(None))
    # the previous tests' actors give their CPUs back asynchronously after ray.kill: start from an
    # idle cluster, not from whatever is still being released
    deadline = time.monotonic() + 120
    while free_cpus() < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert free_cpus() == 4
    with rank_pool_ahead(1) as pool:
        assert pool is not None and len(rank_actors(None)) == before + 1
        got = rank_galleries_on_actors(img, txt, [None], pool=pool)[0].matrices()
        # the pool's actor ranked: none was started for the ranking
        assert len(rank_actors(None)) == before + 1 and len(alive_rank_actors()) == 1
    ref = dense_ranks(img, txt)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    deadline = time.monotonic() + 120                           # ray.kill is asynchronous
    while alive_rank_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_rank_actors()
    with rank_pool_ahead(2) as pool:                            # 2 + 2 + 1 > 4
        assert pool is None
    holder = ray.remote(num_cpus=2)(type("Hold", (), {"ping": lambda self: 1})).remote()
    ray.get(holder.ping.remote())
    try:
        with rank_pool_ahead(1) as pool:                        # 2 free < 3
            assert pool is None and len(rank_actors(None)) == before + 1
    finally:
        ray.kill(holder)
    with RankPool(1, itm_model_dir=str(tmp_path / "no_model")) as pool:
        with pytest.raises(Exception, match="loading the ITM model"):
            pool.load(img, Captions.one_per_image(txt), np.zeros(len(img) * txt.shape[1]), None, (None,), 1)
