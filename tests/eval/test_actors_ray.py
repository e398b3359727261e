"""Eval actors on a real local Ray cluster: sharded ranks equal the single-process computation,
bad input fails fast with a clear message, and a failing actor neither hangs nor lingers."""

import time

import numpy as np
import pytest

from ccrk_ray.eval.actors import rank_on_actors
from ccrk_ray.eval.retrieval import ItmRescorer, encode_split, evaluate_in_process, rank_sharded
from tests.eval.test_retrieval import dense_ranks
from tests.eval.test_sharded import planted_ties, toy_setup
from tests.eval.toy import ToyTwoStage
from tests.conftest import RAY

pytestmark = RAY


def alive_rank_actors():
    import ray
    from ray.util.state import list_actors

    # our cluster's address: other Ray instances may be running on the machine
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    return [a for a in alive if a.class_name == "RankActor"]


def test_actors_equal_dense_with_planted_ties(ray_local):
    img, txt = planted_ties()
    ref = dense_ranks(img, txt)
    stats = {}
    t2i, i2t = rank_on_actors(img, txt, num_actors=2, chunk=16, stats=stats)
    np.testing.assert_array_equal(t2i, ref[0])
    np.testing.assert_array_equal(i2t, ref[1])
    assert stats["shards"] == [(0, 32), (32, 70)] and len(stats["actor_peak_rss_bytes"]) == 2
    assert all(b > 10 << 20 for b in stats["actor_peak_rss_bytes"])        # real processes were measured
    # more shards than actors: the actors take the next shard as they finish
    more = rank_on_actors(img, txt, num_actors=2, chunk=16, shards=[(0, 16), (16, 48), (48, 64), (64, 70)])
    np.testing.assert_array_equal(more[0], ref[0])
    np.testing.assert_array_equal(more[1], ref[1])
    assert not alive_rank_actors()


def test_two_stage_on_actors_equals_in_process(ray_local):
    batch = toy_setup()
    ref = evaluate_in_process(ToyTwoStage(), batch, k_test=5)
    feats = encode_split(ToyTwoStage(), batch)
    rescore = ItmRescorer(ToyTwoStage(), feats["image_tokens"], feats["text_hidden"], feats["text_mask"])
    got = rank_on_actors(feats["image_emb"], feats["text_emb"], num_actors=2, chunk=16, k_test=5, rescore=rescore)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert (got[0] != rank_sharded(feats["image_emb"], feats["text_emb"])[0]).any()    # ITM changed ranks


def test_actor_listing_sees_rank_actors(ray_local):
    """The clean-up checks below would pass vacuously if the listing missed our actors."""
    import ray

    from ccrk_ray.eval.actors import RankActor

    actor = ray.remote(RankActor).remote(np.zeros((2, 2)), np.zeros((2, 1, 2)), np.zeros((2, 1)), [0])
    ray.get(actor.pid.remote())
    assert len(alive_rank_actors()) == 1
    ray.kill(actor)


def test_bad_input_fails_fast_without_starting_actors(ray_local):
    img, txt = planted_ties()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        rank_on_actors(img[:, :5], txt, num_actors=2)
    nan = txt.copy()
    nan[11, 0, 0] = np.nan
    with pytest.raises(ValueError, match="language 'en' hold 1 NaN/inf value.*image 11"):
        rank_on_actors(img, nan, languages=["en", "de", "fr"], num_actors=2)
    with pytest.raises(ValueError, match=r"query language\(s\) 'xx' not in the gallery"):
        rank_on_actors(img, txt, languages=["en", "de", "fr"], query_languages=["xx"], num_actors=2)
    with pytest.raises(ValueError, match=r"empty shard \[16, 16\)"):
        rank_on_actors(img, txt, chunk=16, shards=[(0, 16), (16, 16), (16, 70)], num_actors=2)
    with pytest.raises(ValueError, match="no shards given"):
        rank_on_actors(img, txt, chunk=16, shards=[], num_actors=2)
    with pytest.raises(ValueError, match="do not tile"):
        rank_on_actors(img, txt, chunk=16, shards=[(0, 16), (32, 70)], num_actors=2)
    assert time.perf_counter() - t0 < 60     # a guard against hanging: bad input fails before any shard runs


class Boom:
    def __call__(self, lang, direction, queries, candidates):
        raise ValueError(f"ITM features missing for language {lang}")


def test_an_error_inside_an_actor_surfaces_and_stops_every_actor(ray_local):
    img, txt = planted_ties()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"eval actor failed on shard \[\d+, \d+\): ITM features missing"):
        rank_on_actors(img, txt, num_actors=2, chunk=16, k_test=3, rescore=Boom(), timeout_s=60)
    assert time.perf_counter() - t0 < 60
    deadline = time.monotonic() + 20
    while alive_rank_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_rank_actors()
