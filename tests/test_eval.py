"""Adapting without training: prompts, exemplar selection, generation, proxy-tuning, answer
extraction, label scoring, statistics, and `graft eval`.

Models are tiny random Llamas with the SmolLM2 tokenizer (so real text tokenises as it will in use);
one test embeds with the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturb_adapters
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
import graft.models
from graft import data
from graft.cli import main
from graft.data.prompting import PromptTooLong, Shot, build_prompt, count_tokens, select_exemplars
from graft.decode import (
    EvalConfig,
    ProxyTuner,
    adapter_off,
    adapter_on,
    check_vocabularies,
    evaluate,
    extract_exact,
    extract_number,
    generate,
    majority_vote,
    normalize_text,
    score_continuations,
    wilson_interval,
)

PROMPTS = ["Q: Tom has 3 apples and buys 4 more. How many apples?\nA:", "Hello"]
GSM = [
    {"question": f"Sam has {i} marbles and finds {i + 2} more. How many marbles does Sam have?",
     "answer": f"Sam has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} marbles.\n#### {2 * i + 2}"}
    for i in range(1, 9)
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)


def tiny(tok, seed: int = 0, vocab: int | None = None) -> LlamaForCausalLM:
    """A random Llama (hidden 32, one layer) whose vocabulary matches the SmolLM2 tokenizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab or len(tok), max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny(tok)


def hf_greedy(model, tok, prompts, max_new_tokens):
    """Reference: transformers' own greedy generate, left-padded, cut after EOS."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows


# --------------------------------------------------------------------------------------------
# generation and proxy-tuning


def test_batched_generation_equals_transformers_and_one_by_one(model, tok):
    want = hf_greedy(model, tok, PROMPTS, 12)
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    single = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1)
    assert [g.token_ids[0] for g in batched] == want
    assert [g.token_ids[0] for g in single] == want
    assert batched[0].prompt_tokens == len(tok(PROMPTS[0])["input_ids"])
    assert batched[0].generated_tokens == [len(want[0])]


def test_proxy_with_expert_equal_to_anti_expert_is_the_base(model, tok):
    other = tiny(tok, seed=7)
    tuner = ProxyTuner(model, other, other, alpha=1.5)
    greedy = generate(tuner, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert [g.token_ids[0] for g in greedy] == hf_greedy(model, tok, PROMPTS, 12)
    # sampling: z_expert - z_anti is exactly 0, so the same seed draws the same tokens as the base
    sampled = generate(tuner, tok, PROMPTS, max_new_tokens=10, temperature=1.0, num_samples=3, seed=3)
    base = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, num_samples=3, seed=3)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in base]
    assert len({tuple(t) for t in base[0].token_ids}) > 1  # really sampled


def test_proxy_with_lora_expert_reproduces_the_lora_model(tok):
    model = tiny(tok, seed=1)
    base_tokens = hf_greedy(model, tok, PROMPTS, 12)
    graft.attach(model, graft.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"]))
    perturb_adapters(model, std=0.5)
    lora_tokens = hf_greedy(model, tok, PROMPTS, 12)
    assert lora_tokens != base_tokens  # the adapter changes the output, so the check below means something
    tuner = ProxyTuner(adapter_off(model), adapter_on(model, "default"), adapter_off(model), alpha=1.0)
    out = generate(tuner, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert [g.token_ids[0] for g in out] == lora_tokens
    assert graft.active_adapters(model) == ["default"]  # members restore the adapter state


@pytest.mark.slow
def test_proxy_with_lora_expert_on_smollm2_reproduces_the_lora_model():
    """Acceptance: on SmolLM2 with alpha=1, base + (expert - anti-expert) with the anti-expert = the base
    decodes exactly what the LoRA model decodes (the base terms cancel)."""
    model, tok = graft.models.load("smollm2-135m")
    prompts = ["What is the capital of France?", "Write one sentence about the sea."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in prompts]
    base_tokens = [hf_greedy(model, tok, [p], 16)[0] for p in prompts]
    graft.attach(model, graft.LoRA(r=8, alpha=16, targets="all-linear"))
    perturb_adapters(model, std=0.02)
    lora_tokens = [hf_greedy(model, tok, [p], 16)[0] for p in prompts]
    assert lora_tokens != base_tokens  # the adapter changes the answers, so equality below means something
    tuner = ProxyTuner(adapter_off(model), adapter_on(model, "default"), adapter_off(model), alpha=1.0)
    out = generate(tuner, tok, prompts, max_new_tokens=16, batch_size=1)
    assert [g.token_ids[0] for g in out] == lora_tokens


def test_proxy_refuses_different_vocabularies(model, tok):
    small = tiny(tok, vocab=96)
    with pytest.raises(ValueError, match="one vocabulary.*49152 \\(base\\), 96 \\(expert\\)"):
        ProxyTuner(model, small, small)
    bert = AutoTokenizer.from_pretrained(graft.models.resolve("minilm"), local_files_only=True)
    with pytest.raises(ValueError, match="one vocabulary: tokenizer 1 differs"):
        check_vocabularies([tok, bert])
    check_vocabularies([tok, tok])


class _Step:
    """The "KV cache" of :class:`Script`: how many tokens it has produced."""

    def __init__(self, step):
        self.step = step

    def batch_select_indices(self, rows):
        pass


class Script:
    """A logit source that produces a fixed token sequence whatever the prompt."""

    def __init__(self, tokens, vocab_size):
        self.tokens, self.vocab_size = tokens, vocab_size

    def forward(self, input_ids, attention_mask, position_ids, past=None, keep=1, cache=True):
        step = 0 if past is None else past.step + 1
        logits = torch.full((input_ids.shape[0], keep, self.vocab_size), -1e4)
        logits[:, -1, self.tokens[min(step, len(self.tokens) - 1)]] = 0.0
        return logits, _Step(step)


def test_generate_stops_at_stop_strings_eos_and_max_tokens(tok):
    text = "The answer is 42.\n\nQ: What is next?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    script = Script(ids + [tok.eos_token_id], len(tok))
    out = generate(script, tok, PROMPTS, max_new_tokens=50, stop=["\n\nQ:"])
    assert [g.text for g in out] == ["The answer is 42."] * 2
    assert out[0].generated_tokens[0] < len(ids)
    whole = generate(script, tok, PROMPTS, max_new_tokens=50)
    assert whole[0].text == text and whole[0].token_ids[0] == ids + [tok.eos_token_id]
    short = generate(script, tok, PROMPTS, max_new_tokens=3)
    assert short[0].token_ids[0] == ids[:3]


def test_generate_errors(model, tok):
    with pytest.raises(ValueError, match="needs sampling"):
        generate(model, tok, PROMPTS, num_samples=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        generate(model, tok, PROMPTS, max_new_tokens=0)


# --------------------------------------------------------------------------------------------
# answer extraction

NUMBERS = [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", "72"),
    ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "14"),  # several numbers
    ("The answer is 14 apples, 2 more than the 12 she had.", "14"),  # first number after the phrase
    ("He paid 2 * $500 = $1000 in total, then got $200 back, so he spent $800", "800"),  # the last one
    ("The answer is $1,234.", "1234"),  # thousands separator and a full stop
    ("The total is 1,234,567 dollars.", "1234567"),
    ("The temperature dropped to -5 degrees.", "-5"),
    ("She lost money: -$12.50 overall. The answer is -12.5", "-12.5"),
    ("The answer is 3.50.", "3.5"),
    ("So the answer is 72.0", "72"),
    ("It takes 5-3 = 2 hours.", "2"),  # a minus between numbers is not a sign
    ("Therefore, the answer (arabic numerals) is 18.", "18"),
    ("The final answer: 42", "42"),
    ("#### 1,000", "1000"),
    ("Each box holds 12 eggs, so 5 boxes hold 60 eggs. 60 - 15 = 45 eggs are left.", "45"),
    ("The area is 25 cm^2... wait, 5 cm x 6 cm = 30 cm. The answer is 30 cm.", "30"),
    ("He scored 50% of 80, which is 40.", "40"),
    ("I don't know.", None),
]


@pytest.mark.parametrize(("text", "want"), NUMBERS)
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_extract_number_first_and_exact_match():
    assert extract_number(" 18 apples, because 9 * 2 = 18. Then 36.", "first") == "18"
    assert extract_exact("The answer is Paris.\nMore text") == "Paris"
    assert extract_exact("\n  Mount Everest\nis tall") == "Mount Everest"
    assert normalize_text("The  Eiffel Tower!") == normalize_text("eiffel tower")
    assert majority_vote(["7", None, "8", "8", "7"]) == "7"  # tie: the first seen
    assert majority_vote(["8", "7", "8"]) == "8"
    assert majority_vote([None, None]) is None


# --------------------------------------------------------------------------------------------
# prompts and exemplars


def shots_of(n):
    return [Shot(f"Q: {row['question']}\nA:", f" {row['answer']}") for row in GSM[:n]]


@pytest.mark.parametrize("chat", [False, True])
def test_few_shot_prompt_fits_budget_and_keeps_the_query(tok, chat):
    query = "Q: " + " ".join(["A very long question about marbles and apples."] * 6) + "\nA:"
    alone = build_prompt(query, tokenizer=tok, chat=chat)
    full = build_prompt(query, shots_of(4), tokenizer=tok, chat=chat)
    assert full.shots == 4 and full.tokens > alone.tokens
    for budget in range(alone.tokens, full.tokens + 20, 7):
        prompt = build_prompt(query, shots_of(4), tokenizer=tok, chat=chat, max_tokens=budget)
        assert prompt.tokens == count_tokens(tok, prompt.text, chat) <= budget
        assert query in prompt.text  # whole, never cut
        assert prompt.shots + prompt.dropped == 4
        kept = [s.prompt for s in shots_of(4)[: prompt.shots]]
        dropped = [s.prompt for s in shots_of(4)[prompt.shots:]]
        assert all(k in prompt.text for k in kept) and not any(d in prompt.text for d in dropped)
        if budget >= full.tokens:
            assert prompt.shots == 4
    with pytest.raises(PromptTooLong, match="the query alone needs"):
        build_prompt(query, shots_of(4), tokenizer=tok, chat=chat, max_tokens=alone.tokens - 1)


def test_prompt_layout():
    text = build_prompt("Q: c?\nA:", [Shot("Q: a?\nA:", " 1."), Shot("Q: b?\nA:", " 2.")], instruction="Solve.",
                        response_prefix=" Let's think step by step.").text
    assert text == "Solve.\n\nQ: a?\nA: 1.\n\nQ: b?\nA: 2.\n\nQ: c?\nA: Let's think step by step."


def test_exemplar_selection_first_and_random():
    pool = [f"question {i}" for i in range(20)]
    assert select_exemplars(["question 1", "other"], pool, 3) == [[0, 2, 3], [0, 1, 2]]  # never itself
    a = select_exemplars(["x", "y"], pool, 4, "random", seed=1)
    assert a == select_exemplars(["x", "y"], pool, 4, "random", seed=1)
    assert a[::-1] == select_exemplars(["y", "x"], pool, 4, "random", seed=1)  # per query, not per call
    assert a != select_exemplars(["x", "y"], pool, 4, "random", seed=2)
    assert all(len(set(row)) == 4 for row in a)
    assert 5 not in select_exemplars(["question 5"], pool, 19, "random")[0]


def test_exemplar_selection_similar_with_a_stub_embedder():
    vectors = {"cats": [1.0, 0.05, 0.0], "kittens": [0.9, 0.1, 0.0], "dogs": [0.5, 0.5, 0.0],
               "stocks": [0.0, 0.0, 1.0], "bonds": [0.0, 0.2, 1.0]}

    def embed(texts):
        return torch.tensor([vectors[t] for t in texts])

    pool = ["stocks", "dogs", "kittens", "bonds", "cats"]
    picks = select_exemplars(["cats", "bonds"], pool, 3, "similar", embed=embed)
    assert [pool[i] for i in picks[0]] == ["kittens", "dogs", "bonds"]  # not itself, most similar first
    assert [pool[i] for i in picks[1]] == ["stocks", "dogs", "kittens"]


@pytest.mark.slow
def test_exemplar_selection_similar_with_minilm():
    pool = ["Stock markets fell sharply after the bank raised interest rates.",
            "A kitten is sleeping on the rug.",
            "The recipe needs two cups of flour and an egg."]
    picks = select_exemplars(["The cat is napping on the carpet.", "Shares dropped as rates rose."], pool, 3, "similar")
    assert picks[0][0] == 1 and picks[1][0] == 0


# --------------------------------------------------------------------------------------------
# label scoring and statistics


@pytest.mark.parametrize("candidates", [[" positive", " negative"], [" very negative", " positive", " so-so at best"]])
def test_label_scores_are_the_hand_computed_log_likelihoods(model, tok, candidates):
    prompts = ["Review: a gorgeous, witty film\nSentiment:", "Review: dull\nSentiment:"]
    scores, tokens = score_continuations(model, tok, prompts, candidates, batch_size=3)
    for p, prompt in enumerate(prompts):
        prompt_ids = tok(prompt)["input_ids"]
        for c, cand in enumerate(candidates):
            cand_ids = tok(cand, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + cand_ids])).logits[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            want = sum(logprobs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(cand_ids))
            assert scores[p, c].item() == pytest.approx(want.item(), abs=1e-4)
        assert int(scores[p].argmax()) == max(range(len(candidates)), key=lambda c: scores[p, c].item())
    assert tokens > 0


def test_wilson_interval():
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    z = 1.959963984540054
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)), abs=1e-12)  # closed forms at 0 and n
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z * z), 1.0), abs=1e-12)
    low, high = wilson_interval(20, 200)
    assert low == pytest.approx(0.0657, abs=1e-4) and high == pytest.approx(0.1494, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # the bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n (Wilson's definition)
    n, p_hat = 200, 0.1
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)


# --------------------------------------------------------------------------------------------
# evaluate()


def gsm_records():
    return data.read(GSM)


@pytest.mark.parametrize("strategy", ["zero-shot", "few-shot", "cot", "zero-shot-cot", "self-consistency"])
def test_evaluate_math_strategies(model, tok, strategy):
    cfg = EvalConfig(task="math", strategy=strategy, shots=2, samples=3, max_new_tokens=6, batch_size=4,
                     chat=False, max_prompt_tokens=200)
    result = evaluate(model, tok, gsm_records()[:3], cfg)
    rows, s = result.rows, result.summary
    assert len(rows) == 3 and s["n"] == 3 and 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1
    assert all(r["gold"] == str(2 * i + 4) for i, r in enumerate(rows))
    assert all(r["prompt"].endswith("marbles does Sam have?\nA:" + (" Let's think step by step."
                                                                   if strategy == "zero-shot-cot" else ""))
               for r in rows)
    if strategy in ("few-shot", "cot", "self-consistency"):
        assert all(r["shots"] == 2 for r in rows)
        assert ("<<" in rows[0]["prompt"]) == (strategy != "few-shot")  # rationales only for CoT
        parts = rows[1]["prompt"].split("\n\n")  # exemplars: the first two rows other than itself
        assert [p[:13] for p in parts] == ["Q: Sam has 1 ", "Q: Sam has 3 ", "Q: Sam has 2 "]
    if strategy == "self-consistency":
        assert all(len(r["output"]) == 3 and len(r["votes"]) == 3 for r in rows)
    if strategy == "zero-shot-cot":
        assert all("answer_output" in r for r in rows)
    assert s["tokens"] == s["prompt_tokens"] + s["generated_tokens"] > 0


def test_evaluate_classification_and_budget(model, tok):
    rows = [{"sentence": f"review number {i} " + "words " * (i % 5), "label": i % 2} for i in range(8)]
    cfg = EvalConfig(task="classification", strategy="few-shot", shots=4, labels={0: "negative", 1: "positive"},
                     fields={"text": "sentence"}, chat=False, max_prompt_tokens=60, batch_size=4)
    result = evaluate(model, tok, data.read(rows), cfg)
    for row in result.rows:
        assert set(row["scores"]) == {"negative", "positive"}
        assert row["output"] == max(row["scores"], key=row["scores"].get)
        assert row["correct"] == (row["output"] == row["gold"])
        assert count_tokens(tok, row["prompt"], False) <= 60
    assert result.summary["mean_shots_used"] < 4  # the budget dropped some exemplars
    with pytest.raises(data.DataError, match="labels are integers"):
        evaluate(model, tok, data.read(rows), EvalConfig(task="classification", fields={"text": "sentence"}))
    with pytest.raises(ValueError, match="needs rationales"):
        EvalConfig(task="classification", strategy="cot")


def test_evaluate_exact_match(tok):
    rows = [{"prompt": "Capital of France?\nAnswer:", "completion": " Paris"},
            {"prompt": "Capital of Italy?\nAnswer:", "completion": " Rome"}]
    script = Script(tok(" The answer is paris.\nNext", add_special_tokens=False)["input_ids"], len(tok))
    cfg = EvalConfig(task="exact", strategy="few-shot", shots=1, chat=False, max_new_tokens=12)
    result = evaluate(script, tok, data.read(rows), cfg)
    assert [r["extracted"] for r in result.rows] == ["paris", "paris"]
    assert [r["correct"] for r in result.rows] == [True, False]
    assert result.rows[1]["prompt"] == "Capital of France?\nAnswer: Paris\n\nCapital of Italy?\nAnswer:"


# --------------------------------------------------------------------------------------------
# graft eval


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny(tok, seed=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    gsm = root / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    sst = root / "sst.tsv"
    sst.write_text("sentence\tlabel\n" + "".join(f"a {'fine' if i % 2 else 'bad'} film {i} \t{i % 2}\n"
                                                  for i in range(6)))
    return {"gsm": gsm, "sst": sst}


def run_cli(args, capsys):
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_eval_writes_jsonl_and_table(model_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--model", model_dir, "--data", files["gsm"], "--task", "math", "--strategy", "cot",
                               "--k", 2, "--limit", 3, "--max-new-tokens", 5, "--batch-size", 3,
                               "--no-chat-template", "--out", out], capsys)
    assert code == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {"prompt", "output", "extracted", "gold", "correct"} <= set(rows[0])
    assert rows[0]["gold"] == "4"
    table = (out / "summary.md").read_text()
    assert table.startswith("| model | strategy |") and "cot (k=2)" in table
    assert "accuracy" in stdout and "| math |" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["shots"] == 2 and summary["model"] == str(model_dir)


def test_cli_eval_classification_and_proxy(model_dir, files, tmp_path, capsys):
    code, stdout, _ = run_cli(["--model", model_dir, "--data", files["sst"], "--task", "classification",
                               "--text-field", "sentence", "--labels", "0=bad,1=fine", "--strategy", "few-shot",
                               "--k", 2, "--out", tmp_path / "cls"], capsys)
    assert code == 0, stdout
    rows = [json.loads(line) for line in (tmp_path / "cls" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["gold"] for r in rows} == {"bad", "fine"}
    # an adapter as expert, its disabled self as anti-expert
    model, _ = graft.models.load(model_dir)
    graft.attach(model, graft.LoRA(r=2, targets=["q_proj", "v_proj"]))
    perturb_adapters(model)
    graft.save(model, tmp_path / "adapter")
    code, stdout, err = run_cli(["--model", model_dir, "--data", files["gsm"], "--task", "math", "--strategy", "proxy",
                                 "--expert", tmp_path / "adapter", "--limit", 2, "--max-new-tokens", 4,
                                 "--out", tmp_path / "proxy"], capsys)
    assert code == 0, err
    assert "expert" in (tmp_path / "proxy" / "summary.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "math", "--strategy", "proxy"], "--strategy proxy needs --expert"),
    (["--task", "math", "--strategy", "zero-shot", "--k", "3"], "--k does not apply to --strategy zero-shot"),
    (["--task", "math", "--expert", "x"], "--expert goes with --strategy proxy"),
    (["--task", "classification", "--strategy", "cot", "--data-key", "sst"], "needs rationales"),
    (["--task", "classification", "--text-field", "sentence", "--data-key", "sst"], "--labels 0=negative"),
    (["--task", "classification", "--labels", "0:bad", "--data-key", "sst"], "must look like LABEL=word"),
    (["--task", "classification", "--text-field", "sentence", "--data-key", "gsm", "--labels", "0=a,1=b"],
     "field 'sentence'"),
    (["--task", "math", "--data-key", "sst"], "field 'question' is missing"),
    (["--task", "math", "--data-key", "missing"], "No such file"),
])
def test_cli_eval_errors(model_dir, files, tmp_path, capsys, args, message):
    args = list(args)
    key = "gsm"
    if "--data-key" in args:
        at = args.index("--data-key")
        key = args[at + 1]
        del args[at : at + 2]
    path = files.get(key, tmp_path / "missing.jsonl")
    code, _, err = run_cli(["--model", model_dir, "--data", path, "--out", tmp_path / "o", *args], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # after any progress bar of the model load
    assert last.startswith("graft eval: error:") and message in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_head_gives_the_head_a_contiguous_input_and_the_same_logits(tok, dtype):
    """``logits_to_keep`` hands the head a strided slice (a bf16 CPU linear then copies the whole head
    per row); under ``contiguous_head`` the head sees a contiguous tensor and the logits do not change."""
    from graft.decode.generation import contiguous_head

    model = tiny(tok).to(dtype)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(5, 1000, (3, 9))
    with torch.no_grad():
        plain = model(input_ids=ids, logits_to_keep=1).logits
        with contiguous_head(model):
            fixed = model(input_ids=ids, logits_to_keep=1).logits
        after = model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [False, True, False]  # the hook is gone once the block ends
    torch.testing.assert_close(fixed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)
