"""Reward functions that go wrong in every way the runner must survive.

Kept apart from the test module, with standard-library imports only, so that reward
worker processes (which import the module of each function they run) start fast.
"""

import math
import os
import time


def ok_fn(prompt, response, truth, extra):
    return {"score": float(response == truth), "length": float(len(response))}


def raising_fn(prompt, response, truth, extra):
    raise RuntimeError("reward bug")


def nan_fn(prompt, response, truth, extra):
    return math.nan


def inf_dict_fn(prompt, response, truth, extra):
    return {"score": math.inf}


def wrong_type_fn(prompt, response, truth, extra):
    return "1.0"


def no_score_fn(prompt, response, truth, extra):
    return {"acc": 1.0}


def spinning_fn(prompt, response, truth, extra):
    while True:
        pass


def sleeping_fn(prompt, response, truth, extra):
    time.sleep(3600)


def dying_fn(prompt, response, truth, extra):
    os._exit(3)


FUNCTIONS = {
    "ok": ok_fn,
    "raise": raising_fn,
    "nan": nan_fn,
    "inf": inf_dict_fn,
    "wrong_type": wrong_type_fn,
    "no_score": no_score_fn,
    "spin": spinning_fn,
    "sleep": sleeping_fn,
    "die": dying_fn,
}


def resolve(data_source):
    return FUNCTIONS[data_source]
