"""Scoring answers: a LLaVA answers file against a benchmark's annotations, with the benchmark's own metric.

    answers.jsonl      one {"question_id", "text"} per line (what `infer.py --batch-file` and LLaVA's model_vqa write)
    annotations        JSONL or JSON: {"question_id", "answer": str} or {"question_id", "answers": [str, ...]}
                       (+ "options": [str, ...] for multiple choice, + "category" to get a score per category)
      -> one score per question in [0, 1] (POPE: counts of a yes/no confusion matrix) -> the mean, per category too

    python -m tools.eval answers.jsonl --annotations vqav2_val.jsonl --metric vqa

Metrics, each as its benchmark defines it:
    exact     exact match after lower-casing, trimming and dropping a final period (any of the answers)
    vqa       VQAv2 / TextVQA accuracy: min(#annotators who gave the answer / 3, 1), averaged over the 10 ways of
              leaving one annotator out, after the EvalAI answer normalisation (punctuation, articles, number
              words, contractions) of the prediction and of every annotator's answer
    anls      DocVQA: 1 - normalised Levenshtein distance to the closest answer, 0 when it is 0.5 or more
    relaxed   ChartQA relaxed accuracy: a number within 5% of a nonzero numeric target, else an exact match
    pope      POPE: the answer read as yes or no, then accuracy, precision, recall and F1 of "yes"
    choice    MMBench / AI2D / ScienceQA: the option letter read from the answer, compared with the letter
"""

import argparse
import json
import re
import string
import sys
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# The EvalAI answer normalisation (the VQA evaluation server's, also in LLaVA's m4c_evaluator and lmms-eval)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", "!"]
PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")


def normalize_vqa(text: str) -> str:
    """'The Dog.' -> 'dog', 'Two' -> '2', '3,000' -> '3000', 'a red-and-white bus' -> 'red and white bus'."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # a mark touching a space is dropped, one inside a word ("red-and-white") becomes a space. (The official code
    # also drops every mark when a comma sits between digits; commas are gone by now, so that never applies.)
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if p + " " in text or " " + p in text else " ")
    out = PERIOD_NOT_IN_NUMBER.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


# ----------------------------------------------------------------------------------------------------------------
# Per-question scores: (prediction, gold answers) -> [0, 1]


def exact_match(prediction: str, answers: list[str]) -> float:
    def norm(s):
        return " ".join(s.lower().split()).removesuffix(".").strip()

    return float(norm(prediction) in {norm(a) for a in answers})


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQAv2 rule over the (usually 10) annotators' answers: for each annotator left out, the prediction earns
    min(#remaining annotators who gave it / 3, 1); the mean over the leave-one-out subsets. GT = 3 x "2" and
    7 x "3": "2" earns (3 * 2/3 + 7 * 1) / 10 = 0.9. Every answer is normalised, as TextVQA and lmms-eval do; the VQAv2
    server skips normalising the annotators' answers when all ten agree (they are clean there already)."""
    pred, gold = normalize_vqa(prediction), [normalize_vqa(a) for a in answers]
    matches = sum(g == pred for g in gold)
    # leaving out a matching annotator leaves matches - 1 of them, leaving out another leaves all of them
    scores = [min((matches - (g == pred)) / 3, 1.0) for g in gold]
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity (DocVQA, Biten et al. 2019) of one question:
    1 - d(a, p) / max(|a|, |p|) for the closest answer a, case and surrounding/repeated spaces ignored; 0 when the
    distance is >= threshold."""
    def norm(s):
        return " ".join(s.lower().split())

    pred, best = norm(prediction), 0.0
    for a in map(norm, answers):
        distance = levenshtein(a, pred) / max(len(a), len(pred), 1)
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def relaxed_accuracy(prediction: str, answers: list[str], tolerance: float = 0.05) -> float:
    """ChartQA (Masry et al. 2022, after Methani et al. 2020): numbers within `tolerance` of a nonzero target count
    as right; a trailing % divides by 100; anything else (and a target of 0) must match exactly, ignoring case."""
    def number(s):
        try:
            return float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            return None

    def correct(pred, target):
        p, t = number(pred), number(target)
        if p is not None and t:
            return abs(p - t) / abs(t) <= tolerance
        return pred.lower() == target.lower()

    return float(any(correct(prediction.strip(), a.strip()) for a in answers))


def extract_choice(text: str, options: list[str] | None = None, num_options: int | None = None) -> str | None:
    """The option letter an answer names, by MMBench's rule (which also reads the ScienceQA and AI2D formats):
    with .()[],:;!*#{} turned into spaces, exactly one option letter among the words ("B", "(B)", "B. dog", "The
    answer is B."); a lone lower-case letter ("b") too; else exactly one option's text inside the answer; else None.
    Without options the letters are A to E, the most these benchmarks offer (so "I think B" still reads as B)."""
    letters = string.ascii_uppercase[:num_options or (len(options) if options else 5)]
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    named = {w for w in words if w in letters}
    if len(named) == 1:
        return named.pop()
    if len(words) == 1 and words[0].upper() in letters and not named:
        return words[0].upper()
    if options and not named:
        inside = [letters[i] for i, o in enumerate(options) if str(o).lower() in text.lower()]
        if len(inside) == 1:
            return inside[0]
    return None


def choice_accuracy(prediction: str, answers: list[str], options=None) -> float:
    return float(extract_choice(prediction, options) == answers[0].strip().upper())


# ----------------------------------------------------------------------------------------------------------------
# POPE: yes/no over the whole set


def read_yes_no(text: str) -> str:
    """LLaVA's POPE reading: the text up to the first period, commas removed; a word "No", "no" or "not" makes
    it "no", anything else is "yes" ("There is no dog." -> no, "Nope" -> yes)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_scores(pairs) -> dict:
    """(prediction, "yes"/"no") pairs -> accuracy, precision, recall, F1 ("yes" is the positive class) and the
    share of answers read as yes."""
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for prediction, label in pairs:
        said_yes, is_yes = read_yes_no(prediction) == "yes", label.strip().lower() == "yes"
        c[("t" if said_yes == is_yes else "f") + ("p" if said_yes else "n")] += 1
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "count": n}


PER_QUESTION = {"exact": exact_match, "vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy,
                "choice": choice_accuracy}
METRICS = (*PER_QUESTION, "pope")


# ----------------------------------------------------------------------------------------------------------------
# Files


class EvalError(ValueError):
    """Bad input: the message names the file, the field, and what to do."""


def read_rows(path) -> list[dict]:
    """A JSONL file, a JSON list, or a JSON object holding the list under "annotations" (VQAv2) or "data" (DocVQA)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = None
    if isinstance(rows, dict) and ("annotations" in rows or "data" in rows):
        rows = rows.get("annotations", rows.get("data"))
    elif not isinstance(rows, list):  # JSONL (a one-line JSONL file parses as a single object)
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{number}: not JSON ({e.msg}); expected one JSON object per line") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalError(f"{path}: expected JSON objects, one per line or in a list")
    return rows


def question_id(row: dict, path, number: int):
    qid = row.get("question_id", row.get("questionId"))
    if qid is None:
        raise EvalError(f"{path}: row {number} has no \"question_id\"")
    return str(qid)  # ids are ints in some files and strings in others


def gold_answers(row: dict, path, qid) -> list[str]:
    """"answer": "x", or "answers": ["x", ...] / [{"answer": "x"}, ...] (VQAv2's annotators)."""
    gold = row.get("answers", row.get("answer", row.get("label")))
    gold = [gold] if isinstance(gold, (str, int, float)) else gold
    if not gold or not isinstance(gold, list):
        raise EvalError(f"{path}: question {qid} has no \"answer\" or \"answers\" field")
    return [str(g["answer"] if isinstance(g, dict) else g) for g in gold]


def score_file(answers_path, annotations_path, metric: str) -> dict:
    """Score every answer that has an annotation: {"metric", "score" (or POPE's five numbers), "count",
    "unanswered", "categories": {name: the same, per category}}."""
    if metric not in METRICS:
        raise EvalError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    gold = {question_id(r, annotations_path, i): r for i, r in enumerate(read_rows(annotations_path), 1)}
    by_category, unannotated, seen = {}, [], set()
    for i, row in enumerate(read_rows(answers_path), 1):
        qid = question_id(row, answers_path, i)
        if qid in seen:
            raise EvalError(f"{answers_path}: question_id {qid} is answered twice (row {i}); "
                            f"keep one answer per question")
        seen.add(qid)
        if qid not in gold:
            unannotated.append(qid)
            continue
        if not isinstance(row.get("text"), str):
            raise EvalError(f"{answers_path}: question {qid} has no \"text\" (the answer); "
                            f"expected LLaVA's answer format")
        annotation = gold.pop(qid)
        answers = gold_answers(annotation, annotations_path, qid)
        if metric == "pope":
            item = (row["text"], answers[0])
        elif metric == "choice":
            item = choice_accuracy(row["text"], answers, annotation.get("options"))
        else:
            item = PER_QUESTION[metric](row["text"], answers)
        for category in ("all", *([str(annotation["category"])] if "category" in annotation else [])):
            by_category.setdefault(category, []).append(item)
    if unannotated:
        raise EvalError(f"{answers_path}: {len(unannotated)} answers have no annotation in {annotations_path} "
                        f"(e.g. question_id {unannotated[0]}); is it the annotation file of this benchmark?")
    if not by_category:
        raise EvalError(f"{answers_path}: no answers to score")

    def summary(items):
        return pope_scores(items) if metric == "pope" else {"score": sum(items) / len(items), "count": len(items)}

    everything = by_category.pop("all")
    categories = {name: summary(items) for name, items in sorted(by_category.items())}
    return {"metric": metric, **summary(everything), "unanswered": len(gold),
            **({"categories": categories} if categories else {})}


def report(result: dict) -> str:
    def line(name, r):
        if result["metric"] == "pope":
            return (f"{name}: accuracy {r['accuracy']:.2%}  precision {r['precision']:.2%}  recall {r['recall']:.2%}  "
                    f"F1 {r['f1']:.2%}  yes {r['yes_ratio']:.2%}  ({r['count']} questions)")
        return f"{name}: {result['metric']} {r['score']:.2%}  ({r['count']} questions)"

    lines = [line("all", result)] + [line(f"  {k}", v) for k, v in result.get("categories", {}).items()]
    if result["unanswered"]:
        lines.append(f"note: {result['unanswered']} annotated questions have no answer and are not counted")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("answers", help="answers JSONL: question_id, text")
    p.add_argument("--annotations", required=True,
                   help="JSONL/JSON: question_id, answer or answers (+ options, category)")
    p.add_argument("--metric", required=True, choices=METRICS)
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    args = p.parse_args(argv)
    try:
        result = score_file(args.answers, args.annotations, args.metric)
    except EvalError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result) if args.json else report(result))
    return result


if __name__ == "__main__":
    main()
