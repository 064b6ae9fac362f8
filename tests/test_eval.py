"""tools/eval.py: every metric on cases worked out by hand from its benchmark's definition, the file format, and the
one-line errors. Where lmms-eval is installed, its own normalisation and ChartQA functions are a second oracle."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from tools import eval as ev


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("The Dog.", "dog"), ("3,000", "3000"), ("a red-and-white bus", "red and white bus"),
    ("1.5", "1.5"), ("Yes.", "yes"), ("New York's", "new york 's"), ("dont know", "don't know"),
    ("(left) side", "left side"), ("none", "0"), ("An apple\n", "apple"),
])
def test_vqa_normalisation(raw, normal):
    assert ev.normalize_vqa(raw) == normal


@pytest.mark.parametrize("prediction, gold, accuracy", [
    # 3 annotators said "2": leaving one of them out leaves 2 matches (2/3), leaving out a "3" leaves 3 (1):
    # (3 * 2/3 + 7 * 1) / 10
    ("2", ["2"] * 3 + ["3"] * 7, 0.9),
    ("Two", ["2"] * 3 + ["3"] * 7, 0.9),  # number words are digits after normalisation
    ("3", ["2"] * 3 + ["3"] * 7, 1.0),  # 7 matches: at least 6 remain in every subset
    ("2", ["2"] * 4 + ["3"] * 6, 1.0),  # 4 matches: at least 3 remain
    ("Two.", ["2", "2", "two"] + ["3"] * 7, 0.9),  # annotators' answers are normalised too: 3 matches
    ("yes.", ["yes"] * 10, 1.0),
    ("4", ["2"] * 3 + ["3"] * 7, 0.0),
    ("2", ["2"] + ["3"] * 9, 0.3),  # 1 match: (1 * 0 + 9 * 1/3) / 10
    ("2", ["2"] * 2 + ["3"] * 8, 0.6),  # 2 matches: (2 * 1/3 + 8 * 2/3) / 10
    # TextVQA: "coca-cola" becomes "coca cola", so 7 annotators agree with the prediction
    ("Coca Cola", ["coca cola"] * 4 + ["coca-cola"] * 3 + ["coke"] * 3, 1.0),
    ("Coke.", ["coca cola"] * 4 + ["coca-cola"] * 3 + ["coke"] * 3, 0.9),
    ("pepsi", ["coca cola"] * 4 + ["coca-cola"] * 3 + ["coke"] * 3, 0.0),
])
def test_vqa_accuracy(prediction, gold, accuracy):
    assert ev.vqa_accuracy(prediction, gold) == pytest.approx(accuracy)


@pytest.mark.parametrize("prediction, gold, score", [
    ("Gadsen", ["Gadsden"], 1 - 1 / 7),  # one deletion over 7 characters
    ("1/8/1993", ["1/8/93"], 0.75),  # two insertions over 8
    ("ITC ltd.", ["ITC Limited", "ITC Ltd"], 0.875),  # the closest answer: one edit over 8, case ignored
    ("xyz", ["abc"], 0.0),
    (" 0.25 ", ["0.25"], 1.0),  # surrounding spaces ignored
    ("abcx", ["abcd"], 0.75),
    ("abxx", ["abcd"], 0.0),  # distance exactly 0.5: at the threshold, so 0 (DocVQA: 1 - NL only when NL < 0.5)
])
def test_anls(prediction, gold, score):
    assert ev.anls(prediction, gold) == pytest.approx(score)


@pytest.mark.parametrize("prediction, target, correct", [
    ("12.4", "12", True),  # 3.3 % off
    ("12.7", "12", False),  # 5.8 % off
    ("12.6", "12", True),  # 5.0 % off: within
    ("45%", "0.45", True),  # % divides by 100
    ("45", "45%", False),
    ("1,000", "1000", False),  # no comma handling: a string compare
    ("0.0", "0", False),  # a zero target is compared as a string
    ("Yes", "yes", True),
])
def test_relaxed_accuracy(prediction, target, correct):
    assert ev.relaxed_accuracy(prediction, [target]) == float(correct)


OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("B. dog", "B"), ("The answer is B.", "B"), ("(C) dog", "C"),
    ("It is a dog", "B"),  # no letter: the only option text inside the answer
    ("I think A and B", None),  # two letters: ambiguous
    ("a cat or a dog", None),  # two option texts: ambiguous
    ("E", None),  # not an option
    ("Definitely", None),
])
def test_extract_choice(answer, letter):
    assert ev.extract_choice(answer, OPTIONS) == letter


def test_extract_choice_without_options():
    assert [ev.extract_choice(a) for a in ("I think B", "E.", "F", "(c)")] == ["B", "E", None, "C"]


def test_pope_counts_by_hand():
    pairs = [("Yes", "yes"), ("yes", "yes"), ("No", "yes"), ("Yes.", "no"), ("no", "no"),
             ("Yes, there is a dog.", "yes"), ("There is no dog.", "no"), ("Nope", "no")]
    # read as yes, yes, no, yes, no, yes, no, yes ("Nope" has no "no" word): TP 3, FN 1, FP 2, TN 2
    scores = ev.pope_scores(pairs)
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["precision"] == pytest.approx(3 / 5)
    assert scores["recall"] == pytest.approx(3 / 4)
    assert scores["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert scores["yes_ratio"] == pytest.approx(5 / 8)
    assert [ev.read_yes_no(t) for t in ("No, there is not.", "NO", "not sure")] == ["no", "yes", "no"]


def test_exact_match():
    assert ev.exact_match("Paris.", ["paris"]) == 1.0
    assert ev.exact_match("  The  Eiffel tower ", ["the eiffel tower"]) == 1.0
    assert ev.exact_match("Paris, France", ["paris"]) == 0.0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_file_with_categories_and_unanswered(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "prompt": "Is there a dog?", "text": "Yes", "model_id": "m"},
        {"question_id": 2, "prompt": "Is there a cat?", "text": "No", "model_id": "m"},
        {"question_id": 3, "prompt": "Is there a car?", "text": "Yes", "model_id": "m"},
    ])
    gold = write_jsonl(tmp_path / "pope.jsonl", [
        {"question_id": 1, "label": "yes", "category": "random"},
        {"question_id": 2, "label": "yes", "category": "random"},
        {"question_id": 3, "label": "no", "category": "adversarial"},
        {"question_id": 4, "label": "no", "category": "adversarial"},
    ])
    result = ev.score_file(answers, gold, "pope")
    assert (result["count"], result["unanswered"]) == (3, 1)
    assert result["accuracy"] == pytest.approx(1 / 3)  # TP 1, FN 1, FP 1
    assert result["categories"]["random"]["recall"] == pytest.approx(0.5)
    assert result["categories"]["adversarial"]["precision"] == 0.0

    vqa = tmp_path / "vqav2.json"  # VQAv2's own layout: {"annotations": [{"question_id", "answers": [{"answer"}]}]}
    vqa.write_text(json.dumps({"annotations": [
        {"question_id": q, "answers": [{"answer": a} for a in ["yes"] * 2 + ["no"] * 8]} for q in (1, 2, 3)]}))
    result = ev.score_file(answers, vqa, "vqa")
    # "yes" twice: 2 x 1/3 + 8 x 2/3 over 10 = 0.6; "no" eight times: 1.0
    assert result["score"] == pytest.approx((0.6 + 1.0 + 0.6) / 3)


def test_choice_file_uses_the_options(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "q1", "text": "a dog"},
                                                 {"question_id": "q2", "text": "A"}])
    gold = write_jsonl(tmp_path / "g.jsonl", [{"question_id": "q1", "answer": "B", "options": OPTIONS},
                                              {"question_id": "q2", "answer": "C", "options": OPTIONS}])
    assert ev.score_file(answers, gold, "choice")["score"] == 0.5


@pytest.mark.parametrize("answers, gold, message", [
    ('{"question_id": 1, "text": "x"}\n', '{"question_id": 2, "answer": "x"}\n',
     r"1 answers have no annotation in .*g.jsonl \(e.g. question_id 1\)"),
    ('{"question_id": 1, "answer": "x"}\n', '{"question_id": 1, "answer": "x"}\n', r'question 1 has no "text"'),
    ('{"question_id": 1, "text": "x"}\nnot json\n', '{"question_id": 1, "answer": "x"}\n', r"a.jsonl:2: not JSON"),
    ('{"question_id": 1, "text": "x"}\n', '{"question_id": 1}\n', r'question 1 has no "answer" or "answers"'),
    ('{"question_id": 1, "text": "x"}\n{"question_id": 1, "text": "y"}\n', '{"question_id": 1, "answer": "x"}\n',
     r"question_id 1 is answered twice \(row 2\)"),
])
def test_bad_files_are_one_line_errors(tmp_path, answers, gold, message):
    (tmp_path / "a.jsonl").write_text(answers)
    (tmp_path / "g.jsonl").write_text(gold)
    with pytest.raises(SystemExit, match=message):
        ev.main([str(tmp_path / "a.jsonl"), "--annotations", str(tmp_path / "g.jsonl"), "--metric", "exact"])


def test_command_line(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Gadsen"},
                                                 {"question_id": 2, "text": "xyz"}])
    gold = write_jsonl(tmp_path / "g.jsonl", [{"question_id": 1, "answers": ["Gadsden"]},
                                              {"question_id": 2, "answer": "abc"}])
    done = subprocess.run([sys.executable, "-m", "tools.eval", str(answers), "--annotations", str(gold),
                           "--metric", "anls", "--json"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["score"] == pytest.approx((1 - 1 / 7) / 2)
    missing = subprocess.run([sys.executable, "-m", "tools.eval", str(tmp_path / "nope.jsonl"),
                              "--annotations", str(gold), "--metric", "anls"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file"]


def lmms_eval_file(relative):
    """A module file of the installed lmms-eval, loaded on its own (its package __init__ pulls in datasets)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None:
        pytest.skip("lmms-eval is not installed (CI installs it with --no-deps)")
    path = spec.submodule_search_locations[0] + "/" + relative
    module_spec = importlib.util.spec_from_file_location(relative.replace("/", "_"), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


ANSWERS = ["Two", "The Dog.", "3,000", "a red-and-white bus", "1.5", "Yes.", "New York's", "dont", "it's 10 o'clock!",
           "x-ray; 5 > 3", "none of the above", "He said \"hi\"", "U.S.A.", "2.5.", "email@site", "(a) left", "wont go"]


def test_normalisation_equals_lmms_evals(tmp_path):
    processor = lmms_eval_file("tasks/_task_utils/vqa_eval_metric.py").EvalAIAnswerProcessor()
    assert [ev.normalize_vqa(a) for a in ANSWERS] == [processor(a) for a in ANSWERS]


def test_relaxed_accuracy_equals_lmms_evals():
    chartqa = lmms_eval_file("tasks/chartqa/utils.py")
    for prediction, target in [("12.4", "12"), ("12.7", "12"), ("45%", "0.45"), ("45", "45%"), ("1,000", "1000"),
                               ("0.0", "0"), ("Yes", "yes"), ("-3", "-3.1"), ("abc", "ABC"), ("7", "seven")]:
        assert ev.relaxed_accuracy(prediction, [target]) == float(chartqa.relaxed_correctness(prediction, target))
