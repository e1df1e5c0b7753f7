import os
import subprocess
import sys

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (set before they are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")

# A tiny run: 512 images of 32 px, 16-wide convnet, batch 32.
TINY = [
    "data.builtin.num_train=512",
    "data.builtin.num_test=256",
    "data.batch_size=32",
    "model.width=16",
    "train.progress=false",
    "train.log_every_steps=1",
    "data.num_workers=1",
]


# The slow tier: tests that train, benchmark or compile in subprocesses, each over ~5 s of one
# worker on the 2-core CPU (measured with --durations; a new test that slow goes here too).
# Fast tier, for the edit loop (about 1 minute on 2 workers): pytest -n 2 -m "not slow" tests
SLOW = {
    "test_bank.py": {"test_two_ranks_apply_every_ranks_batch_and_agree"},
    "test_benchmarks.py": {
        "test_imagenet_headline_tiny_prints_its_table",
        "test_bank_precision_benchmark_tiny",
        "test_entry_point_tiny_writes_report",
        "test_exemplar_benchmark_tiny",
        "test_kernel_benchmark_tiny",
        "test_lab_benchmark_tiny",
        "test_pipeline_benchmark_tiny",
    },
    "test_cli.py": {"test_doctor", "test_report", "test_train_eval_export"},
    "test_doctor.py": {
        "test_a_failing_component_gives_exit_1_and_the_others_still_run",
        "test_quick_json_every_component_on_cpu",
        "test_training_row_and_unknown_names",
        "test_the_method_rows_come_from_the_registry",
    },
    "test_eval.py": {"test_eval_cli_writes_json", "test_random_init_and_bad_checkpoint"},
    "test_exemplar_authors.py": {
        "test_fixed_set_survives_a_kill_and_resume_bit_exactly",
        "test_short_run_with_every_authors_switch",
    },
    "test_exemplar.py": {
        "test_builtin_learn_run_trains_clusters_retrains_and_beats_random_init",
        "test_resume_from_the_checkpoint_written_as_the_second_stage_began",
        "test_materialise_then_train_from_the_file",
        "test_processes_do_not_import_torchvision_unless_a_resnet_is_built",
        "test_train_cluster_retrain_and_resume_bit_exactly_across_the_clustering",
        "test_torch_pipeline_resumes_bit_exactly_after_a_kill_mid_epoch",
    },
    "test_gpu_acceptance.py": {
        "test_acceptance_tiny_gives_every_sections_rows_and_the_readme_renders_them",
        "test_a_section_stopped_half_way_keeps_the_rows_it_finished",
        "test_acceptance_without_dali_still_gives_pipeline_and_loss_rows",
        "test_train_step_failure_row_has_the_stderr_and_knn_impls",
    },
    "test_fallback.py": {
        "test_auto_trains_on_the_tensor_executor_without_dali",
        "test_explicit_dali_pipeline_without_dali_stops_in_one_line",
    },
    "test_step_settings.py": {
        "test_compile_compiles_the_backbone_and_keeps_the_checkpoint",
        "test_nan_step_skipped_on_the_device_with_the_fused_optimiser",
    },
    "test_sync.py": {"test_host_reads_do_not_grow_with_the_steps", "test_the_counter_sees_the_old_per_step_read"},
    "test_gpu_ready.py": {
        "test_the_one_time_check_compiles_the_variants_training_launches",
        "test_a_fused_backward_returning_half_the_gradient_is_caught_in_bf16",
        "test_ddp_does_not_rebroadcast_the_state_a_method_keeps_consistent",
        "test_every_kernel_configuration_compiles_for_sm90_and_sm80_and_fits",
        "test_training_continues_on_eager_when_the_kernel_check_fails",
    },
    "test_export.py": {"test_layerwise_raw_input_export_round_trip"},
    "test_folder_configs.py": {"test_train_on_your_own_images"},
    "test_guide.py": {"test_the_tools_take_the_example_with_no_other_edit"},
    "test_install.py": {
        "test_wheel_installs_and_runs_outside_the_checkout",
        "test_core_install_without_dali_or_faiss_trains_evaluates_and_reports",
        "test_train_nproc_ctrl_c_stops_every_rank_with_a_checkpoint",
    },
    "test_invp_authors.py": {"test_each_authors_mode_trains"},
    "test_invp.py": {
        "test_ablations_run",
        "test_bank_and_graph_survive_kill_and_resume",
        "test_bank_consistent_under_two_process_ddp",
        "test_builtin_learn_run_beats_random_init",
        "test_graph_with_approximate_index_runs",
    },
    "test_kernels.py": {"test_training_loss_fused_matches_eager"},
    "test_layerwise_authors.py": {"test_short_run_per_mode"},
    "test_layerwise.py": {
        "test_sigkill_in_second_stage_then_resume_equals_uninterrupted",
        "test_transferred_first_layer_beats_random_init",
        "test_two_stages_freeze_the_first_and_write_filters",
    },
    "test_monitor.py": {"test_monitor_changes_nothing_in_training", "test_monitor_logged_for_every_method"},
    "test_multinode.py": {"test_two_nodes_one_process_each"},
    "test_reliability.py": {
        "test_evaluation_preempted_then_resumed",
        "test_failed_checkpoint_write_keeps_the_previous_one",
        "test_invalid_config_values_are_refused_naming_the_key",
        "test_nan_loss_is_skipped_and_counted",
        "test_nan_losses_in_a_row_stop_the_run_keeping_the_last_checkpoint",
        "test_nan_skip_under_two_process_ddp",
        "test_splitbrain_sigkill_then_resume_equals_uninterrupted_run",
        "test_training_skips_bad_files_and_runs_whole_epochs",
        "test_truncated_checkpoint_is_reported_on_resume",
    },
    "test_report.py": {"test_report_of_a_layerwise_run", "test_report_of_a_real_run"},
    "test_splitbrain.py": {"test_short_run_beats_random_init"},
    "test_train.py": {
        "test_resume_without_checkpoint_starts_fresh_and_bad_checkpoint_is_reported",
        "test_resume_with_changed_settings_says_which",
        "test_sc_beats_random_init_under_the_linear_probe",
        "test_sigkill_then_resume_equals_uninterrupted_run",
        "test_sigterm_checkpoints_and_exits_zero_then_resumes",
        "test_sigusr1_to_one_rank_stops_both",
        "test_torch_pipeline_trains_too",
        "test_two_process_gloo_ddp_writes_the_run_files",
    },
}


# Tests that start several processes (torchrun, torch.distributed with gloo): `-m ddp` runs them alone.
DDP = {
    "test_bank.py": {"test_two_ranks_apply_every_ranks_batch_and_agree"},
    "test_cli.py": {"test_train_nproc_runs_torchrun"},
    "test_folder.py": {"test_two_rank_run_checks_the_folder_once"},
    "test_install.py": {"test_train_nproc_ctrl_c_stops_every_rank_with_a_checkpoint"},
    "test_gpu_ready.py": {"test_ddp_does_not_rebroadcast_the_state_a_method_keeps_consistent"},
    "test_invp.py": {"test_bank_consistent_under_two_process_ddp"},
    "test_multinode.py": {"test_two_nodes_one_process_each"},
    "test_reliability.py": {"test_nan_skip_under_two_process_ddp"},
    "test_train.py": {"test_two_process_gloo_ddp_writes_the_run_files", "test_sigusr1_to_one_rank_stops_both"},
}
# Tests that train a method and check that its features beat a random-init network's: `-m learning`.
LEARNING = {
    "test_exemplar.py": {"test_builtin_learn_run_trains_clusters_retrains_and_beats_random_init"},
    "test_invp.py": {"test_builtin_learn_run_beats_random_init"},
    "test_layerwise.py": {"test_transferred_first_layer_beats_random_init"},
    "test_splitbrain.py": {"test_short_run_beats_random_init"},
    "test_train.py": {"test_sc_beats_random_init_under_the_linear_probe"},
}
MARKS = {"slow": SLOW, "ddp": DDP, "learning": LEARNING}  # (the markers are declared in pyproject.toml)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark, tests in MARKS.items():
            names = tests.get(item.path.name, ())
            if item.originalname in names or item.name in names:
                item.add_marker(getattr(pytest.mark, mark))


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(args, timeout=600, check=True, env_extra=None, **kw):
    e = env()
    e.update(env_extra or {})
    p = subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train_cmd(out_dir, *overrides, config="configs/sc/builtin.yaml", nproc=None, tiny=True):
    """``fastssl/train.py`` on ``config``: shrunk to the TINY run, or (``tiny=False``) the config's
    own run without progress bar or TensorBoard (the learning tests)."""
    base = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    size = TINY if tiny else ["train.progress=false", "train.tensorboard=false"]
    return base + ["fastssl/train.py", "--config", config, f"out_dir={out_dir}", *size, *overrides]


def eval_trained_and_random(run_dir, protocol, *overrides):
    """``python -m fastssl.eval`` of ``run_dir``'s last checkpoint and of the same network
    untrained (``--random-init``): their result files, (trained, random)."""
    import json

    res = []
    for flag in ([], ["--random-init"]):
        run(
            [
                PY,
                "-m",
                "fastssl.eval",
                "--checkpoint",
                str(os.path.join(run_dir, "checkpoints", "last.pt")),
                "--protocol",
                protocol,
                *flag,
                *overrides,
            ]
        )
        with open(os.path.join(run_dir, f"eval_{protocol}{'_random' if flag else ''}.json")) as f:
            res.append(json.load(f))
    return tuple(res)


def blocked_imports(folder, *modules) -> dict:
    """Environment additions that make ``import <module>`` (and its sub-modules) raise ImportError
    in a child process, as on a machine without the package: a ``sitecustomize`` in ``folder``,
    first on PYTHONPATH, puts a finder at the front of ``sys.meta_path``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(
            "import sys\n"
            f"BLOCKED = {tuple(modules)!r}\n"
            "class _Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if any(name == m or name.startswith(m + '.') for m in BLOCKED):\n"
            "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
            "sys.meta_path.insert(0, _Block())\n"
        )
    return {"PYTHONPATH": str(folder) + os.pathsep + ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def kill_and_resume(tmp_path, common, config, kill_range):
    """The crash-resume experiment every method's test runs: an uninterrupted run, and the same
    run SIGKILLed after a random step in ``kill_range`` (low, high) then resumed.  Returns the
    reference's final checkpoint, the checkpoint left by the crash, the resumed run's final
    checkpoint and the kill step."""
    import signal

    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(train_cmd(ref, *common, config=config))
    kill_at = int(torch.randint(*kill_range, (1,)))
    p = run(train_cmd(out, *common, config=config), check=False, env_extra={"FASTSSL_KILL_AT_STEP": str(kill_at)})
    assert p.returncode == -signal.SIGKILL
    after_crash = load_ckpt(out / "checkpoints" / "last.pt")
    run(train_cmd(out, *common, config=config) + ["--resume"])
    return load_ckpt(ref / "checkpoints" / "last.pt"), after_crash, load_ckpt(out / "checkpoints" / "last.pt"), kill_at


@pytest.fixture
def tiny_cfg():
    from fastssl.config import load_config

    def make(*overrides, config=os.path.join(ROOT, "configs/sc/builtin.yaml")):
        return load_config(config, [*TINY, *overrides])

    return make
