
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
    assert 0 < args.val_tokens <= 262_144  # capped: a benchmark scores a slice
    assert args.compile is False


@pytest.mark.parametrize("profile", sorted(train_gpt.PROFILES))
def test_profiles_leave_no_training_time_idle(profile):
    """The stages' shares of the budget add up to all of it (a share moved from one stage must
    go to another)."""
    args = Hyperparameters.from_env({"PROFILE": profile})
    assert args.teacher_time_frac + args.distill_time_frac == pytest.approx(1.0)


def test_any_setting_overrides_the_profile():
    args = Hyperparameters.from_env({"PROFILE": "cpu_smoke", "MODEL_DIM": "64", "SEED": "7",
                                     "COMPILE": "true", "KNN_LAMBDA": "0.25"})
    assert (args.model_dim, args.seed, args.compile, args.knn_lambda) == (64, 7, True, 0.25)
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
    ({"KNN_KEY_DIM": "0"}, "KNN_KEY_DIM=0"),
    ({"DISTILL_HISTORY_TOKENS": "0"}, "DISTILL_HISTORY_TOKENS=0"),
    ({"TTT_BATCH_ROWS": "0"}, "TTT_BATCH_ROWS=0"),
    ({"EAM_CONTEXT_ORDER": "7"}, r"EAM_CONTEXT_ORDER=7: 0 \(no memory\) to 6"),
    ({"EAM_CONTEXT_MIN_LENGTH": "0"}, r"EAM_CONTEXT_MIN_LENGTH=0: must lie in 1\.\..* = 3"),
    ({"EAM_CONTEXT_ORDER": "2"}, r"EAM_CONTEXT_MIN_LENGTH=2: must lie in 1\.\..* = 1"),
    ({"EAM_CONTEXT_MIN_COUNT": "0"}, "EAM_CONTEXT_MIN_COUNT=0"),
    ({"EAM_LEARNED_LENGTHS": "3,6"}, "EAM_LEARNED_LENGTHS='3,6': increasing lengths from "
                                     "EAM_CONTEXT_ORDER=4 to 64"),
    ({"EAM_LEARNED_LENGTHS": "8,6"}, "EAM_LEARNED_LENGTHS='8,6'"),
    ({"EAM_LEARNED_LENGTHS": "6,65"}, "EAM_LEARNED_LENGTHS='6,65'"),
    ({"EAM_LEARNED_LENGTHS": "six"}, "EAM_LEARNED_LENGTHS='six'"),
    # Misspelt or retired names are refused with the closest setting.
    ({"KNN_CHUNK_TOKENS": "512"}, r"KNN_CHUNK_TOKENS='512' is not a setting \(did you mean "
                                  r"EVAL_CHUNK_TOKENS\?\)"),
    ({"EAM_LOCATIONS": "1"}, r"EAM_LOCATIONS='1' is not a setting"),
    ({"DISTILL_KEY_FRAC": "0.1"}, r"DISTILL_KEY_FRAC='0.1' is not a setting \(did you mean "),
    ({"TTT_STEP": "2"}, r"did you mean TTT_STEPS\?"),
])
def test_bad_values_name_the_variable(environ, variable):
    with pytest.raises(ValueError, match=variable):
        Hyperparameters.from_env(environ)


def test_variables_that_are_no_settings_family_pass_untouched():
    """Only names that look like a setting are refused: the environment has many others."""
    args = Hyperparameters.from_env({"HOME": "/root", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0",
                                     "TORCHELASTIC_RUN_ID": "x", "MASTER_PORT": "29500"})
    assert args == Hyperparameters.from_env({})


def test_settings_are_frozen():
    args = Hyperparameters.from_env({})
    with pytest.raises(AttributeError):
        args.seed = 3
