import dataclasses
import re

import pytest

import train_gpt

Hyperparameters = train_gpt.Hyperparameters


def test_competition_defaults_and_run_id():
    args = Hyperparameters.from_env({})
    assert args.profile == "competition"
    assert args.max_wallclock_seconds == 600.0
    assert args.val_tokens == 0
    assert args.size_limit == 16_000_000
    assert args.run_id == "competition_seed1337"


@pytest.mark.parametrize("profile", ["cpu_smoke", "cpu_proxy", "cpu_converged"])
def test_cpu_profiles_cap_validation_and_only_the_smoke_run_reads_the_demo_data(profile):
    """The demo corpus is for the set-up run; the benchmarks read the challenge's paths (FineWeb,
    or web text through DATA_PATH)."""
    args = Hyperparameters.from_env({"PROFILE": profile})
    competition = Hyperparameters.from_env({})
    assert args.data_path == (train_gpt.DEMO_DATA if profile == "cpu_smoke"
                              else competition.data_path)
    assert args.val_tokens == 65536
    assert args.compile is False


@pytest.mark.parametrize("profile", sorted(train_gpt.PROFILES))
def test_profiles_leave_no_training_time_idle(profile):
    """The stages' shares of the budget add up to all of it (a share moved from one stage must
    go to another); one that writes no associative locations gives the write stage no share,
    and one whose encoder is the whole teacher gives the key phase none."""
    args = Hyperparameters.from_env({"PROFILE": profile})
    assert args.teacher_time_frac + args.eam_time_frac + args.distill_time_frac == (
        pytest.approx(1.0))
    assert args.eam_locations > 1 or args.eam_time_frac == 0
    # An encoder that starts as the teacher's exact copy already has its keys (test_teacher).
    assert args.enc_layers < args.num_layers or args.distill_key_frac == 0


def test_any_setting_overrides_the_profile():
    args = Hyperparameters.from_env({"PROFILE": "cpu_smoke", "MODEL_DIM": "64", "SEED": "7",
                                     "DEC_SEES_ENCODER": "false", "KNN_LAMBDA": "0.25"})
    assert (args.model_dim, args.seed, args.dec_sees_encoder, args.knn_lambda) == (64, 7, False,
                                                                                   0.25)
    assert args.run_id == "cpu_smoke_seed7"


@pytest.mark.parametrize("environ, variable", [
    ({"PROFILE": "gpu_huge"}, "PROFILE"),
    ({"MODEL_DIM": "wide"}, "MODEL_DIM"),
    ({"COMPILE": "maybe"}, "COMPILE"),
    ({"VAL_TOKENS": "-5"}, "VAL_TOKENS"),
    ({"KNN_LAMBDA": "1.0"}, "KNN_LAMBDA"),
    ({"EVAL_STRIDE": "0"}, "EVAL_STRIDE"),
    ({"ENC_LAYERS": "99"}, "ENC_LAYERS"),
    ({"QUANT_BITS": "4"}, "QUANT_BITS"),
    ({"TEACHER_TIME_FRAC": "0.9"}, "TEACHER_TIME_FRAC"),
    ({"EAM_TOP_TOKENS": "0"}, "EAM_TOP_TOKENS=0"),
    ({"EAM_READ_ALPHA": "0"}, "EAM_READ_ALPHA=0.0"),
    ({"TTT_BATCH_ROWS": "0"}, "TTT_BATCH_ROWS=0"),
    ({"EAM_CONTEXT_ORDER": "1"}, "EAM_CONTEXT_ORDER=1"),
    ({"EAM_CONTEXT_ORDER": "7"}, "EAM_CONTEXT_ORDER=7.*fit int64"),
    ({"EAM_CONTEXT_MIN_LENGTH": "0"}, r"EAM_CONTEXT_MIN_LENGTH=0: must lie in 1\.\..* = 3"),
    ({"EAM_CONTEXT_ORDER": "2"}, r"EAM_CONTEXT_MIN_LENGTH=2: must lie in 1\.\..* = 1"),
    ({"EAM_CONTEXT_MIN_COUNT": "0"}, "EAM_CONTEXT_MIN_COUNT=0"),
    ({"KNN_CHUNK_TOKENS": "512"}, "KNN_CHUNK_TOKENS='512': this setting is now called "
                                  "EVAL_CHUNK_TOKENS"),
])
def test_bad_values_name_the_variable(environ, variable):
    with pytest.raises(ValueError, match=variable):
        Hyperparameters.from_env(environ)


# The removed settings and why each went (docs/measurements.md, "Memory ideas, measured").
NO_GAIN = ("EAM_READ_STEPS", "EAM_READ_DAMPING", "EAM_READ_TOL", "ENC_RECUR_STEPS",
           "EVAL_ENC_RECUR_STEPS", "EAM_KEY_LAYER", "DEC_PRIOR_RANK")
HIDDEN_MEMORY = ("EAM_VALUES", "EAM_GAMMA", "EAM_ETA", "EAM_ETA_FLOOR", "EAM_ETA_DECAY", "EAM_TAU",
                 "EAM_NOVELTY", "EAM_SPLIT_COUNT", "EAM_MERGE_THRESHOLD")


@pytest.mark.parametrize("name, reason", [
    *((name, "it measured no gain") for name in NO_GAIN),
    *((name, "it belonged to the hidden-state memory, which measured worse than next-token "
             "counts") for name in HIDDEN_MEMORY)])
def test_a_removed_setting_is_refused_saying_so(name, reason):
    assert name.lower() not in {field.name for field in dataclasses.fields(Hyperparameters)}
    with pytest.raises(ValueError, match=re.escape(
            f"{name}='1': this setting was removed ({reason}; see docs/measurements.md, "
            "\"Memory ideas, measured\")")):
        Hyperparameters.from_env({name: "1"})
    assert set(train_gpt.REMOVED_SETTINGS) == {*NO_GAIN, *HIDDEN_MEMORY}


def test_settings_are_frozen():
    args = Hyperparameters.from_env({})
    with pytest.raises(AttributeError):
        args.seed = 3
