"""Push collapsed models to the local hub stand-in with the real huggingface_hub client, then pull them back.

Run by tests/test_hub.py in a subprocess with HF_ENDPOINT pointing at ../shared/hubstub/server.py (it must be set
before huggingface_hub is imported). Prints one JSON line of findings for the test to assert on.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_collapse  # noqa: E402
from hf_collapse.hub import loading_code, model_card, push_to_hub, save_with_card  # noqa: E402
from tiny_models import CASES_BY_NAME, output_of  # noqa: E402

store = Path(sys.argv[1])
findings = {}
for name, removal, repo_id in (("bert", ["encoder.layer.2"], "tester/bert-collapsed"),
                               ("mobilenet_v2", ["layer.3"], "tester/mobilenet-collapsed"),
                               ("dit", ["transformer_blocks.1"], "tester/dit-collapsed")):
    case = CASES_BY_NAME[name]
    model = case.build()
    scores = {removal[0]: 0.5}
    collapsed, report = hf_collapse.collapse(model, scores, num_blocks=1, eval_fn=lambda m: 0.75,
                                             metric_name="accuracy", latency_repeats=1, progress=False)
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

    push_to_hub(collapsed, repo_id, report=report, token="hf_test", base_model="tester/base",
                datasets=["tester/data"])
    pushed = store / repo_id
    local_files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    pushed_files = sorted(p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file())
    result["same_files"] = local_files == pushed_files
    result["files"] = pushed_files
    result["same_bytes"] = all((local / f).read_bytes() == (pushed / f).read_bytes() for f in local_files
                               if f in pushed_files)

    cache = tempfile.mkdtemp()
    if hf_collapse.collapse_record(collapsed)["plain_reload_exact"]:
        again = type(collapsed).from_pretrained(repo_id, cache_dir=cache, token="hf_test")
    else:
        again = hf_collapse.AutoCollapsedModel.from_pretrained(repo_id, cache_dir=cache, token="hf_test")
    result["pulled_error"] = (output_of(again.eval(), inputs) - expected).abs().max().item()
    findings[name] = result

print(json.dumps(findings))
