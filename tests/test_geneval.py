"""The toy GenEval: its rules on hand-built scenes, its prompt splits, its errors, and its readers against the
renderer's truth on fresh scenes."""
import numpy as np
import pytest
import torch

from ddpo_course.geneval import (TASKS, Detection, agreement, all_prompts, check, geneval_prompts, geneval_score,
                                 load_detector, near_miss, parse_prompt, read_components, scene_for, true_detections,
                                 truth)
from ddpo_course.scenes import Layout, SceneObject, render_scene

O = SceneObject

def verdict(prompt, *objects):
    ims = torch.from_numpy(render_scene(Layout(objects, "gray")))[None]
    by_rules = check(parse_prompt(prompt), true_detections(Layout(objects, "gray")))[0]
    by_detector = geneval_score(ims, [prompt])["correct"].item()
    by_components = geneval_score(ims, [prompt], read_components)["correct"].item()
    return by_rules, by_detector, by_components

@pytest.mark.parametrize("prompt,objects,expected", [
    ("a photo of three squares", [O("square", "red", 4, x, 16) for x in (6, 16, 26)], True),
    ("a photo of two squares", [O("square", "red", 4, x, 16) for x in (6, 16, 26)], False),       # n + 1 fails
    ("a photo of four squares", [O("square", "red", 4, x, 16) for x in (6, 16, 26)], False),      # one short
    ("a photo of a cross left of a circle", [O("cross", "blue", 5, 8, 14), O("circle", "green", 5, 24, 18)], True),
    ("a photo of a cross right of a circle", [O("cross", "blue", 5, 8, 14), O("circle", "green", 5, 24, 18)], False),
    ("a photo of a triangle above a square", [O("triangle", "red", 5, 16, 7), O("square", "blue", 5, 14, 24)], True),
    ("a photo of a triangle below a square", [O("triangle", "red", 5, 16, 7), O("square", "blue", 5, 14, 24)], False),
    ("a photo of a yellow circle and a purple cross", [O("circle", "yellow", 5, 8, 9), O("cross", "purple", 5, 23, 22)], True),
    ("a photo of a purple circle and a yellow cross", [O("circle", "yellow", 5, 8, 9), O("cross", "purple", 5, 23, 22)], False),
    ("a photo of an orange triangle", [O("triangle", "orange", 8, 16, 16)], True),
    ("a photo of a red triangle", [O("triangle", "orange", 8, 16, 16)], False),
])
def test_each_rule_on_a_hand_built_scene(prompt, objects, expected):
    assert verdict(prompt, *objects) == (expected,) * 3

def test_the_splits_are_disjoint_and_cover_every_prompt():
    for t in TASKS:
        train, test = geneval_prompts("train", t), geneval_prompts("test", t)
        assert not set(train) & set(test) and sorted(train + test) == sorted(all_prompts(t))
    assert geneval_prompts("test", "single_object") == all_prompts("single_object")

@pytest.mark.parametrize("prompt", ["a photo of a dog", "two circles", "a photo of five circles",
                                    "a photo of a circle near a square", "a red circle on a white background"])
def test_a_prompt_outside_the_templates_is_named(prompt):
    with pytest.raises(ValueError, match="follows none of toy GenEval's templates"):
        geneval_score(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), [prompt])

def test_partial_credit_counts_the_checks_that_hold():
    objs = [O("cross", "blue", 5, 8, 14), O("circle", "green", 5, 24, 18)]
    assert check(parse_prompt("a photo of a cross right of a circle"), true_detections(Layout(tuple(objs), "white"))) == (False, 2 / 3)
    assert check(parse_prompt("a photo of a green cross and a blue circle"), true_detections(Layout(tuple(objs), "white"))) == (False, 0.5)

def test_the_detector_agrees_with_the_renderer_on_fresh_scenes_of_every_task():
    got = agreement(load_detector(), per_task=200, seed=12345)
    assert min(got.values()) >= 0.98, got

def test_the_components_reading_agrees_with_the_renderer_too():
    got = agreement(read_components, per_task=100, seed=54321)
    assert min(got.values()) >= 0.95, got

def test_every_prompt_has_a_scene_that_meets_it_and_one_that_nearly_does():
    rng = np.random.default_rng(7)
    for t in TASKS:
        for p in all_prompts(t)[:20]:
            assert truth(p, scene_for(parse_prompt(p), rng)) and not truth(p, near_miss(parse_prompt(p), rng))
