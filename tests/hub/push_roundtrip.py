"""Push collapsed models to the local hub stand-in with the real huggingface_hub client, then pull them back.

Run by tests/test_hub.py in a subprocess with HF_ENDPOINT pointing at tests/local_hub.py (it must be set before
huggingface_hub is imported), or at the real Hub with HF_COLLAPSE_REAL_HUB=1 (see local_hub.HubTarget). Prints one
JSON line of findings for the test to assert on.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from local_hub import HubTarget  # noqa: E402
from tiny_models import CASES_BY_NAME, dit_pipeline, output_of, pipeline_images  # noqa: E402

import hf_collapse  # noqa: E402
from hf_collapse.hub import loading_code, model_card, push_to_hub, save_with_card  # noqa: E402
from hf_collapse.tlc import activation_sites, activation_statistics, linearize  # noqa: E402


def same_files(local: Path, pushed: Path) -> dict:
    local_files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    pushed_files = sorted(p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file())
    return {
        "same_files": local_files == pushed_files,
        "files": pushed_files,
        "same_bytes": all(
            (local / f).read_bytes() == (pushed / f).read_bytes() for f in local_files if f in pushed_files
        ),
    }


def download_snapshot(repo_id: str) -> Path:
    """The pushed repository, fetched file by file into a fresh cache with the real client (``model_info``'s file
    list, then ``hf_hub_download``), so that the card's own loading code runs on what the Hub serves."""
    from huggingface_hub import HfApi, hf_hub_download

    cache = tempfile.mkdtemp()
    files = [s.rfilename for s in HfApi(token=target.token).model_info(repo_id).siblings]
    paths = [hf_hub_download(repo_id, f, cache_dir=cache, token=target.token) for f in files]
    return Path(paths[files.index("model_index.json")]).parent


store = Path(sys.argv[1])
target = HubTarget()
findings = {}
for name, removal, repo_id in (
    ("bert", ["encoder.layer.2"], target.repo("bert-collapsed")),
    ("mobilenet_v2", ["layer.3"], target.repo("mobilenet-collapsed")),
    ("dit", ["transformer_blocks.1"], target.repo("dit-collapsed")),
):
    case = CASES_BY_NAME[name]
    model = case.build()
    scores = {removal[0]: 0.5}
    collapsed, report = hf_collapse.collapse(
        model, scores, num_units=1, eval_fn=lambda m: 0.75, metric_name="accuracy", latency_repeats=1, progress=False
    )
    inputs = case.inputs()
    expected = output_of(collapsed, inputs)

    card = model_card(collapsed, report, repo_id=repo_id, base_model="tester/base", datasets=["tester/data"])
    card.validate()  # POST /api/validate-yaml: the metadata is what the Hub accepts
    result = {
        "metric_value": card.data.eval_results[0].metric_value,
        "report_metric": report.after.metric,
        "tags": card.data.tags,
        "library": card.data.library_name,
        "params_in_card": hf_collapse.report.format_count(report.after.params) in card.text,
        "flops_in_card": hf_collapse.report.format_count(report.after.flops) in card.text,
        "uses_auto_collapsed": "AutoCollapsedModel" in card.text,
    }

    local = Path(tempfile.mkdtemp())
    save_with_card(collapsed, local, report, repo_id=repo_id, base_model="tester/base", datasets=["tester/data"])
    namespace = {}
    exec(loading_code(collapsed, str(local)), namespace)  # the card's own loading code, on the saved folder
    result["card_code_error"] = (output_of(namespace["model"].eval(), inputs) - expected).abs().max().item()

    push_to_hub(
        collapsed,
        repo_id,
        report=report,
        token=target.token,
        private=target.private,
        base_model="tester/base",
        datasets=["tester/data"],
    )
    result.update(same_files(local, target.pushed(store, repo_id)))

    cache = tempfile.mkdtemp()
    if hf_collapse.collapse_record(collapsed)["plain_reload_exact"]:
        again = type(collapsed).from_pretrained(repo_id, cache_dir=cache, token=target.token)
    else:
        again = hf_collapse.AutoCollapsedModel.from_pretrained(repo_id, cache_dir=cache, token=target.token)
    result["pulled_error"] = (output_of(again.eval(), inputs) - expected).abs().max().item()
    findings[name] = result


# Diffusers pipelines: the whole pipeline is pushed, its collapsed transformer inside. A removed DiT block is
# expressed by the config (plain DiTPipeline.from_pretrained); a TLC-linearized MLP on top of it is not (the card
# loads that component with AutoCollapsedModel and passes it to the pipeline).
for name, linearized, repo_id in (
    ("dit_pipeline", False, target.repo("dit-pipeline-collapsed")),
    ("dit_pipeline_tlc", True, target.repo("dit-pipeline-tlc")),
):
    pipe = dit_pipeline()
    collapsed, report = hf_collapse.collapse(
        pipe.transformer,
        {"transformer_blocks.1": 0.5},
        num_units=1,
        eval_fn=lambda m: 0.75,
        metric_name="accuracy",
        latency_repeats=1,
        progress=False,
    )
    if linearized:
        site = activation_sites(collapsed)[0]
        stats = activation_statistics(collapsed, [CASES_BY_NAME["dit"].inputs()], [site])[site.name]
        collapsed = linearize(collapsed, stats)
    pipe.transformer = collapsed
    expected = pipeline_images(pipe)
    card = model_card(pipe, report, repo_id=repo_id, base_model="tester/base")
    card.validate()
    result = {
        "metric_value": card.data.eval_results[0].metric_value,
        "report_metric": report.after.metric,
        "tags": card.data.tags,
        "library": card.data.library_name,
        "params_in_card": hf_collapse.report.format_count(report.after.params) in card.text,
        "flops_in_card": hf_collapse.report.format_count(report.after.flops) in card.text,
        "uses_auto_collapsed": "AutoCollapsedModel" in card.text,
        "names_component": "`transformer`" in card.text,
    }

    local = Path(tempfile.mkdtemp())
    save_with_card(pipe, local, report, repo_id=repo_id, base_model="tester/base")
    namespace = {}
    exec(loading_code(pipe, str(local)), namespace)
    result["card_code_error"] = (pipeline_images(namespace["pipe"]) - expected).abs().max().item()

    push_to_hub(pipe, repo_id, report=report, token=target.token, private=target.private, base_model="tester/base")
    result.update(same_files(local, target.pushed(store, repo_id)))
    result["unchanged_by_push"] = torch.equal(pipeline_images(pipe), expected)

    namespace = {}
    exec(loading_code(pipe, str(download_snapshot(repo_id))), namespace)  # the card's code on what the Hub serves
    result["pulled_error"] = (pipeline_images(namespace["pipe"]) - expected).abs().max().item()
    findings[name] = result

print(json.dumps(findings))
