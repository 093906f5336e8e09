"""random_words_csv.py OUT ROWS WORDS LABELS: a CSV of ROWS texts of WORDS random words each, drawn
(seeded) from 40,000, with labels 0..LABELS-1 in turn. Enough words make the WordPiece
vocabulary fleet-train builds reach BERT's 30,522 entries, so --preset base has BERT-base's
size. Used by the training and network benchmarks."""
import csv
import random
import sys

out_path, rows, words_per_row, labels = sys.argv[1], *map(int, sys.argv[2:5])
random.seed(1)
words = [f"w{i}" for i in range(40000)]
with open(out_path, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["text", "label"])
    for i in range(rows):
        out.writerow([" ".join(random.choices(words, k=words_per_row)), i % labels])
