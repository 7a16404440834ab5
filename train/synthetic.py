"""Built-in verifiable text tasks for the embedded tiny default (SFT mixture search and RLVR on a CPU).

Each task has a train split, a disjoint held-out split (both deterministic given a seed) and an exact-match checker,
so the same data serves SFT (`prompt` -> `response`), held-out loss, generation-based accuracy and RL rewards.
Prompts are a task word and a short payload ("reverse 50721" -> "12705"), tens of tokens at most, so a
few-million-parameter transformer trained from scratch on two CPU cores can learn most of them in minutes. Every
payload is digits: the tiny tokenizer (`tiny_tokenizer()`) makes each digit one token and only merges letters, so
copying, reversing and adding work on one token per character (a merged "12" would make reversal a lookup table).

The tasks differ on purpose in learning speed, so that multi-task SFT mixture search (mSFT) sees sub-datasets whose
held-out scores peak at different times (payloads of 3-5 digits; sizes are the training rows):

  task      example                      train  designed for
  majority  majority 11101111011 -> 1       64  peaks first, then overfits: only clear majorities (>= 8 of 11 bits),
                                                so the rule is learned in under an epoch, but 40% of the training
                                                labels are flipped and configs/tiny_sft.toml draws these rows 20x, so
                                                they are memorised next; held-out labels are clean, so held-out accuracy
                                                falls from ~0.9 to ~0.75 and held-out loss rises (early stopping curve)
  reverse   reverse 50721 -> 12705        3000  fast: learned in one to two epochs once an induction head forms
  copy      copy 50721 -> 50721           3000  fast, a little after reverse in the mixture; both then saturate at 1.0
  mod       mod 821%4 -> 1                 800  medium, partial: the last two digits decide; plateaus near 0.5
  sort      sort 31415 -> 11345           1500  slow: counting digits; still improving at the end of the run
  add       add 12+45 -> 57               2000  slowest: carries; barely above zero within the default run

Measured with the default `python -m posttrain.train.sft --config configs/tiny_sft.toml` (1.67M params, 2048-token
micro-batches, AdamW lr 3e-3 cosine, 6 epochs = 651 steps, seed 0; 2-core CPU, torch 2.13.0): 2 min 58 s wall
including 25 evaluations and the HF export at load average 0.9-1.9 from other jobs (3 min 33 s at 1.7-2.1, same
numbers: the run is deterministic), 6,700-8,100 training tokens/s, training loss 1.41 at step 50 -> 0.22 at step 650.
Held-out exact match (all 128 held-out rows per task) at each quarter epoch:

  epoch     0.26 0.51 0.76 1.00 1.25 1.50 1.75 2.01 2.26 2.51 2.76 3.00
  majority  0.53 0.88 0.91 0.62 0.84 0.77 0.80 0.53 0.75 0.77 0.75 0.80
  reverse   0.01 0.01 0.30 0.55 0.90 0.85 0.95 0.95 0.97 0.96 0.98 0.97
  copy      0.00 0.02 0.20 0.29 0.36 0.56 0.66 0.74 0.72 0.80 0.86 0.92
  mod       0.27 0.27 0.30 0.33 0.40 0.25 0.41 0.49 0.48 0.34 0.48 0.56
  sort      0.00 0.01 0.04 0.09 0.18 0.16 0.13 0.27 0.30 0.27 0.30 0.37
  add       0.01 0.00 0.00 0.01 0.00 0.01 0.02 0.00 0.02 0.01 0.01 0.01

  epoch     3.25 3.50 3.75 4.00 4.26 4.51 4.76 5.01 5.26 5.50 5.75 6.00
  majority  0.75 0.76 0.75 0.77 0.74 0.64 0.75 0.75 0.75 0.75 0.74 0.74
  reverse   0.98 0.99 1.00 0.98 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00
  copy      0.95 1.00 0.98 0.98 0.98 0.98 0.98 1.00 1.00 1.00 0.99 1.00
  mod       0.50 0.46 0.48 0.52 0.48 0.51 0.45 0.52 0.56 0.46 0.46 0.50
  sort      0.41 0.50 0.65 0.66 0.61 0.67 0.71 0.74 0.71 0.84 0.81 0.86
  add       0.02 0.02 0.03 0.02 0.01 0.00 0.02 0.01 0.01 0.02 0.02 0.05

Majority's held-out loss is lowest at 0.75 epochs (0.19) and 0.26-0.30 from epoch 2 on; reverse and copy reach 1.0
by 3.5-3.75 epochs, sort keeps climbing to the end, add is the task that needs a longer run. Single points are noisy
(majority's 0.62 at 1.0 and 0.53 at 2.0 are one-eval dips; copy's and sort's speed varies by about half an epoch
between runs whose data differ), so mSFT should compare smoothed or loss-based scores.

The "msft" set (`data.synthetic = "msft"`; configs/tiny_msft_sft.toml trains it with plain SFT) is the mixture for
overfitting-aware mixture search (train/msft.py), where the default's single overfitting task leaves any gain within
noise. Three small tasks have label noise on their training rows only and are drawn many times per epoch, so each
learns its rule, then memorises its wrong labels (the intent: its held-out accuracy then falls; what was measured is
below); their rules are learned at different speeds, which spreads the peaks. Copy, reverse and sort are clean and
still learning when the first task peaks. Every held-out split has 500 rows (standard error <= 2.2 points per
evaluation). A wrong label is another digit (another bit for vote), so it is still a well-formed answer:

  task     example                 train  noise  draws per row and epoch
  vote     vote 1101101111011 -> 1    64    40%  10.5  majority of 13 bits, only clear ones (>= 9 alike)
  first    first 50721 -> 5          100    50%  10.5  the first digit
  last     last 50721 -> 1           300    50%   4.2  the last digit
  copy     copy 50721 -> 50721      3000     0    0.7
  reverse  reverse 50721 -> 12705   3000     0    0.7
  sort     sort 31415 -> 11345      1500     0    0.5

Measured (2026-11-29; torch 2.13.0+cpu, Python 3.11.7, OMP_NUM_THREADS=1): the SFT baseline of the mSFT study
(`python -m posttrain.train.msft --config configs/tiny_msft.toml --msft.methods=...`, train.seed = data.seed = s), i.e. plain
SFT of the whole mixture (1.67M params, 2048-token micro-batches, AdamW lr 3e-3 constant after 20 warm-up steps) for
the tokens mSFT spent, about 5.5 epochs. Its first 3 epochs are bitwise the earlier configs/tiny_msft_sft.toml runs
(the run is deterministic). Held-out exact match (all 500 rows per task) at each quarter epoch; "overall" is the
micro-average over the 3,000 rows:

seed 0
  epoch    0.00 0.26 0.51 0.75 1.01 1.26 1.50 1.76 2.01 2.25 2.51 2.76
  vote     0.00 0.00 0.56 0.81 0.83 0.89 0.92 0.83 0.74 0.72 0.83 0.63
  first    0.00 0.15 0.30 0.41 0.51 0.41 0.41 0.44 0.42 0.39 0.42 0.43
  last     0.00 0.20 0.40 0.55 0.55 0.62 0.75 0.78 0.84 0.76 0.87 0.78
  copy     0.00 0.00 0.00 0.03 0.09 0.15 0.18 0.35 0.52 0.69 0.69 0.73
  reverse  0.00 0.00 0.01 0.05 0.13 0.31 0.45 0.58 0.82 0.90 0.93 0.97
  sort     0.00 0.00 0.01 0.04 0.08 0.08 0.11 0.15 0.21 0.17 0.16 0.22
  overall  0.00 0.06 0.21 0.31 0.36 0.41 0.47 0.52 0.59 0.61 0.65 0.63

  epoch    3.00 3.26 3.51 3.75 4.01 4.26 4.50 4.76 5.00 5.26 5.51 5.75
  vote     0.67 0.51 0.73 0.78 0.74 0.78 0.70 0.50 0.84 0.63 0.63 0.65
  first    0.49 0.40 0.51 0.46 0.69 0.66 0.55 0.66 0.48 0.51 0.51 0.58
  last     0.78 0.90 0.82 0.81 0.64 0.65 0.86 0.66 0.68 0.88 0.78 0.73
  copy     0.68 0.82 0.71 0.83 0.89 0.88 0.88 0.90 0.88 0.90 0.87 0.90
  reverse  0.95 0.97 0.97 0.99 0.99 0.97 0.99 0.97 0.97 0.96 0.99 0.99
  sort     0.27 0.21 0.17 0.33 0.30 0.29 0.32 0.29 0.40 0.41 0.47 0.42
  overall  0.64 0.63 0.65 0.70 0.71 0.71 0.72 0.67 0.71 0.71 0.71 0.71
seed 1
  epoch    0.00 0.26 0.50 0.76 1.01 1.25 1.51 1.76 2.00 2.26 2.51 2.75
  vote     0.00 0.00 0.48 0.50 0.81 0.84 0.75 0.68 0.76 0.82 0.57 0.76
  first    0.00 0.19 0.16 0.31 0.41 0.55 0.58 0.31 0.37 0.53 0.40 0.45
  last     0.00 0.18 0.29 0.41 0.47 0.46 0.43 0.75 0.95 0.89 0.83 0.75
  copy     0.00 0.00 0.01 0.01 0.06 0.20 0.25 0.43 0.45 0.43 0.46 0.54
  reverse  0.00 0.00 0.01 0.02 0.03 0.08 0.36 0.64 0.91 0.84 0.90 0.92
  sort     0.00 0.00 0.00 0.02 0.02 0.02 0.03 0.09 0.07 0.07 0.08 0.06
  overall  0.00 0.06 0.16 0.21 0.30 0.36 0.40 0.48 0.58 0.60 0.54 0.58

  epoch    3.01 3.26 3.50 3.76 4.01 4.25 4.50 4.76 5.01 5.25 5.51
  vote     0.71 0.55 0.70 0.76 0.73 0.77 0.75 0.79 0.58 0.81 0.70
  first    0.50 0.45 0.47 0.41 0.45 0.60 0.58 0.57 0.47 0.52 0.46
  last     0.58 0.77 0.82 0.66 0.82 0.80 0.92 0.94 0.94 0.96 0.98
  copy     0.65 0.70 0.73 0.62 0.76 0.74 0.76 0.79 0.77 0.78 0.73
  reverse  0.89 0.99 1.00 0.41 0.99 0.95 0.99 0.98 0.95 0.92 0.99
  sort     0.11 0.09 0.11 0.10 0.11 0.12 0.08 0.19 0.15 0.11 0.15
  overall  0.57 0.59 0.64 0.49 0.64 0.66 0.68 0.71 0.64 0.68 0.67
seed 2
  epoch    0.00 0.26 0.50 0.75 1.01 1.26 1.50 1.76 2.01 2.25 2.51 2.75
  vote     0.00 0.48 0.79 0.88 0.90 0.75 0.63 0.81 0.54 0.82 0.77 0.86
  first    0.00 0.06 0.35 0.39 0.57 0.63 0.61 0.47 0.63 0.55 0.57 0.66
  last     0.00 0.04 0.28 0.52 0.51 0.54 0.52 0.62 0.60 0.52 0.63 0.57
  copy     0.00 0.00 0.00 0.07 0.11 0.07 0.13 0.35 0.36 0.47 0.57 0.63
  reverse  0.00 0.00 0.01 0.03 0.07 0.10 0.19 0.48 0.42 0.65 0.86 0.81
  sort     0.00 0.00 0.01 0.05 0.03 0.03 0.05 0.07 0.07 0.14 0.12 0.17
  overall  0.00 0.10 0.24 0.32 0.36 0.35 0.35 0.47 0.44 0.52 0.59 0.62

  epoch    3.01 3.26 3.50 3.75 4.01 4.26 4.50 4.76 5.01 5.25 5.51
  vote     0.90 0.76 0.84 0.75 0.73 0.77 0.77 0.73 0.84 0.83 0.87
  first    0.58 0.60 0.59 0.55 0.74 0.66 0.67 0.61 0.48 0.66 0.44
  last     0.55 0.78 0.60 0.78 0.67 0.72 0.63 0.61 0.77 0.76 0.70
  copy     0.64 0.78 0.81 0.62 0.59 0.75 0.74 0.85 0.90 0.89 0.83
  reverse  0.89 0.83 0.88 0.68 0.85 0.91 0.85 0.94 0.94 0.90 0.89
  sort     0.20 0.23 0.19 0.17 0.15 0.29 0.27 0.30 0.25 0.31 0.25
  overall  0.63 0.66 0.65 0.59 0.62 0.69 0.66 0.67 0.70 0.72 0.66
What the tables show. Over the first 3 epochs the three noisy tasks peak and fall: seed 0 first at 1.0 (0.51,
then 0.39-0.44), vote at 1.5 (0.92, then 0.63-0.83), last at 2.5 (0.87, then 0.78); when first peaks, all the others
are still improving. But the order is the seed's (seed 1: vote 1.25, first 1.5, last 2.0; seed 2: vote 1.0, first
1.25, last 1.75-2.5), and over 5.5 epochs the falls are not lasting: the noisy tasks fluctuate by 20-40 points
between neighbouring evaluations (vote 0.50 -> 0.84 -> 0.63 in seed 0) around a level that does not decline (seed
1's last ends at its best, 0.98; seed 0's first has its best, 0.69, at 4.0). Memorising 40-50% wrong one-token
labels on 64-300 rows moves the tiny model's answers back and forth; it does not erase the rule. So this mixture has
heterogeneous learning speeds and noisy peaks, not the durable early overfitting mSFT is built for (what that does
to mSFT: train/msft.py's docstring). A single point is noisy; compare smoothed or loss-based scores.

From a pretrained base: the "msft-flaws" and "msft-base" sets (configs/tiny_msft_pretrained.toml). Random label noise
makes no lasting fall (above), so "msft-flaws" has systematic flaws instead (FLAWS): on a training row whose payload has
a trigger feature the label follows a second rule; held-out rows with the feature keep the truth, so a model that learns
the flaw loses about the feature's share of the held-out rows, and keeps losing it. "msft-base" is the base's corpus:
clean rows of copy, reverse, sort and vote from another random stream, none of whose prompts (train or held-out) occurs
in "msft-flaws" for the same seed; configs/tiny_msft_base.toml trains it for 2 epochs (at its end, on msft-flaws'
held-out rows: vote 0.88-1.00, reverse 0.89-0.99, copy 0.52-0.75, sort 0.08-0.34, first 0.00-0.06 and last 0.00-0.26:
the base was never asked for them). What the base brings, where each trigger looks and how many training rows carry each
flaw are what stagger the peaks:

  task   flaw                          train  weight  keep  training rows  held-out rows   base   under SFT
                                                            it changes     it turns wrong  knows
  vote   bits 1, 7 and 13 alike           300    3000     1  34-37%         36-38%          yes    falls first
         -> the minority
  first  digits 2 and 3                   600    2400   0.7  25-27%         31-32%          no     rises, falls last
         not multiples of 3 -> 0
  last   digit 1 and the last digit      1200    2400  0.35  17%            34-37%          no     rises, falls
         not multiples of 3 -> 0

Copy, reverse and sort are "msft"'s, clean (weights 4000, 4000, 1500). A flaw must be harder to learn than its rule to
come after it (below), and large enough that, once learned, it costs 10 points or more. `keep` thins the triggered rows
of the training split only (a training draw with the trigger is kept with that probability; the held-out rows keep the
natural 36%), which parts when a flaw is learned (its share of the training rows) from how far its task falls (its share
of the held-out rows). What orders first's and last's flaws is where their triggers look: last's reads the last digit,
which last's rule reads anyway, and is learned about an epoch before first's (digits 2 and 3, which first's rule
ignores), though fewer of its training rows carry it. From the base, plain SFT on "msft-flaws" for 5 epochs (AdamW 3e-4
constant after 20 warm-up steps, the pretrained study's bases, rows and settings: the SFT baseline of that study
continued past mSFT's tokens, its evaluations up to 2.76-3.51 epochs bitwise the study's; 500 held-out rows per task,
all three seeds, 2026-12-06, torch 2.13.0+cpu, OMP_NUM_THREADS=1):

  seed 0
  epoch    0.00 0.25 0.51 0.76 1.00 1.26 1.51 1.75 2.01 2.25 2.50 2.76 3.00 3.25 3.51 3.76 4.00 4.25 4.51 4.76 5.00
  vote     1.00 0.99 0.98 0.93 0.87 0.83 0.73 0.65 0.65 0.57 0.59 0.57 0.62 0.63 0.64 0.64 0.66 0.59 0.64 0.63 0.65
  first    0.00 0.45 0.44 0.69 0.81 0.65 0.66 0.76 0.74 0.84 0.78 0.79 0.66 0.75 0.71 0.59 0.67 0.71 0.70 0.71 0.67
  last     0.00 0.35 0.52 0.78 0.89 0.88 0.77 0.79 0.83 0.81 0.82 0.74 0.70 0.64 0.68 0.67 0.67 0.67 0.68 0.67 0.66
  copy     0.75 0.92 0.99 0.99 0.98 0.99 0.98 0.99 1.00 0.99 0.99 1.00 1.00 1.00 0.99 1.00 0.99 0.99 1.00 1.00 0.98
  reverse  0.97 0.99 1.00 0.99 1.00 1.00 1.00 1.00 0.99 1.00 1.00 1.00 1.00 0.99 1.00 1.00 1.00 1.00 1.00 1.00 1.00
  sort     0.21 0.26 0.48 0.49 0.52 0.63 0.65 0.69 0.76 0.74 0.75 0.77 0.85 0.82 0.84 0.83 0.87 0.84 0.87 0.83 0.85
  seed 1
  epoch    0.00 0.25 0.51 0.75 1.00 1.26 1.50 1.76 2.01 2.25 2.51 2.76 3.00 3.26 3.51 3.75 4.01 4.26 4.50 4.76 5.00
  vote     0.88 0.97 0.86 0.68 0.67 0.69 0.58 0.60 0.60 0.64 0.63 0.63 0.62 0.62 0.64 0.61 0.63 0.65 0.65 0.64 0.61
  first    0.01 0.26 0.48 0.85 0.75 0.67 0.70 0.71 0.79 0.76 0.76 0.81 0.86 0.89 0.69 0.67 0.64 0.80 0.90 0.68 0.75
  last     0.00 0.74 0.81 0.86 0.86 0.76 0.69 0.81 0.60 0.63 0.67 0.72 0.67 0.65 0.62 0.65 0.73 0.62 0.66 0.70 0.68
  copy     0.52 0.67 0.69 0.73 0.75 0.77 0.78 0.81 0.82 0.83 0.87 0.86 0.88 0.87 0.89 0.89 0.94 0.91 0.93 0.94 0.93
  reverse  0.89 0.99 0.99 0.99 0.98 0.99 0.98 0.98 0.98 0.97 0.98 0.97 0.98 0.98 0.98 0.98 0.98 0.98 0.98 0.99 0.99
  sort     0.08 0.17 0.19 0.24 0.31 0.38 0.40 0.43 0.48 0.55 0.54 0.60 0.60 0.63 0.63 0.64 0.61 0.60 0.69 0.73 0.72
  seed 2
  epoch    0.00 0.25 0.51 0.75 1.01 1.26 1.50 1.76 2.00 2.25 2.51 2.76 3.00 3.26 3.50 3.76 4.01 4.25 4.51 4.75 5.00
  vote     0.99 0.95 0.98 0.59 0.64 0.65 0.58 0.63 0.73 0.73 0.71 0.68 0.65 0.65 0.62 0.67 0.66 0.65 0.62 0.64 0.64
  first    0.06 0.28 0.62 0.60 0.86 0.86 0.86 0.76 0.78 0.91 0.81 0.88 0.76 0.84 0.77 0.68 0.83 0.68 0.72 0.82 0.69
  last     0.26 0.65 0.82 0.52 0.72 0.86 0.76 0.69 0.85 0.75 0.70 0.75 0.65 0.67 0.66 0.63 0.69 0.66 0.69 0.75 0.65
  copy     0.67 0.74 0.91 0.95 0.99 0.98 1.00 0.99 0.99 0.99 0.99 0.99 0.99 1.00 0.99 1.00 1.00 1.00 0.99 0.99 1.00
  reverse  0.99 0.92 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00 1.00
  sort     0.34 0.44 0.53 0.60 0.63 0.74 0.78 0.80 0.84 0.83 0.87 0.81 0.83 0.86 0.90 0.92 0.83 0.95 0.80 0.92 0.92

What the tables show (read with `mixture_shape`, train/msft.py: a task overfits when the evaluations after its first
argmax, at least two, average 10 points or more below it). Vote, which the base knows, is at its best at c = 0-0.25 and
falls for good (29-33 points on average after it). Last and first rise from 0.00-0.26; last's flaw is learned first,
first's about an epoch later, and each then falls for good: vote, last and first overfit at 0, 1.00 and 2.25 epochs in
seed 0 (falls of 29, 16 and 14 points), at 0, 1.26 and 2.25 in seed 2 (falls of 31, 16 and 13), and at 0.25, 1.00 and
4.50 in seed 1 (falls of 33, 18 and 18), with copy and sort (and reverse, but in seed 1) still improving after vote's
peak: the three-peak criterion holds in every seed. Seed 1's third peak is the weakest: first reaches 0.85 at 0.75 epoch
and then swings between 0.64 and 0.90 until the end, so its argmax at 4.50, two evaluations before the end, is a swing
up, and its "fall" the two evaluations after it. Single evaluations still swing by 10-25 points (first 0.81 -> 0.65 ->
0.76 in seed 0), so a first argmax over a plateau is partly chance, and that is what mSFT's rule reads (train/msft.py).
Within the study's shorter windows (mSFT's tokens: 3.52, 2.83 and 3.23 epochs) the criterion holds in seed 0 only: in
seed 1 first overfits at 0.75 (0.85, then 0.74 on average), 0.25 epoch before last, and in seed 2 first's evaluations
after its peak at 2.25 average 9 points below it (in the fall-test study's windows, 3.52-3.53 epochs, it holds in every
seed). The set's second version (last's trigger on digits 1 and 2, sharing digit 2 with first's) met the criterion over
5 epochs in seeds 0 and 1 and missed it in seed 2, where first and last learned their flaws together (overfit at 1.00
and 1.26; its tables: train/synthetic.py at commit 7a6a7b4). The first version had parity triggers and no thinning
("digits 2 and 3 even -> 0", "digits 1 and 2 even -> 0": 22-24% of the held-out rows): first and last peaked at the same
evaluation in every seed (1.26-2.01 epochs) and fell 7-12 points (its tables: train/synthetic.py at commit 103c9fa).

How the design was found (2026-12-06; one run per variant and seed 0 unless said, each a base and then 3 epochs of
plain SFT from it; the variants' full tables are in train/synthetic.py at commit 39007b9). Forty-odd variants of the
base, the flaws, the tasks, the weights, the lr, the optimizer and the model size showed:

- A task the base knows is at its best at or near the start and falls as its flaw is learned (the first version of
  this set, whose base knew all six tasks: every flawed task peaked within 0.75 epoch, mostly at c = 0); one it half
  knows (a base that saw 20-60 of its rows) peaks at 0-0.5 epoch, its rule's gain and its flaw's loss overlapping.
- The mixture weights do not set a task's pace. Halving or doubling first's draws (1200-4800 per epoch) moved
  neither its rise nor its fall. Three majority tasks of 13, 15 and 17 bits with the same flaw (asked under task
  words new to the base) fell from 0.5, 0.75 and 1.0 epoch at weights 4000 / 1600 / 700, but from 1.0, 0.75 and 0.75
  at 1400 / 560 / 310: a flaw of one kind is learned once, for all the tasks that share it. A likely reason for the
  rest: AdamW normalises each parameter's step, so a direction that only one task's rows move goes at about the same
  pace whatever that task's share. Plain SGD (momentum 0.9, lr 0.02; 0.1 and 0.4 undo the base) did not stagger them
  either.
- A flaw comes after its rule when its trigger is a conjunction over fixed positions (two digits' parity, three bits
  alike: 25-38% of the rows); one as easy as the rule ("last digit 7-9", "digit 2 even and digit 3 >= 3") is learned
  with it, a plateau at one minus its share with no peak; one that asks whether two digits are equal is not learned
  within 3 epochs. At lr 1e-3 a flaw shows within 0.25-0.75 epoch of the first draws that can teach it, which leaves
  a task little time to rise first; hence 3e-4.
- The held-out loss is no better a peak signal: for a task the base knows it rises from the first evaluation (the
  flaw lowers the confidence on triggered rows well before it flips their answers) while the accuracy may stay at its
  plateau for an epoch.
- A 2.8x larger model (4.66M parameters) behaves like the tiny one.
- From this set's bases, giving last another kind of flaw (digits 1 and 2 even -> the first digit) parts the peaks of
  first and last in two seeds of three (vote, first, last at 0, 1.26, 2.01 epochs in seed 0; 0, 1.76, 2.25 in seed
  2; 0.25, 1.26, 1.00 in seed 1), but only seed 0 keeps both falls at 10 points or more (seed 1: last 0.80, then
  0.75-0.79; seed 2: first 0.89, then 0.78-0.87).
- Harder triggers do not make a later third peak (a second session the same day: 15 runs of 8 variants from this set's
  bases, seeds 0 and 1, 3.5-5 epochs, the other flaws as here). On last: "digits 1 and 2 of the same parity -> 0"
  (half the rows) makes last swing between 0.18 and 0.81 from one evaluation to the next in both seeds; "digit 1
  exceeds digit 2 by 3 or more -> 0" (28%) is learned with the rule (a plateau at 0.57-0.82); "digits 1 and 2 of the
  same parity and digit 3 even -> 0" (25%) is learned late (last 0.98 at 1.26 epochs and 0.97 at 3.0; 0.72-0.81 from
  4.3 on with four micro-batches per step, below), but in between last swings with first (both 0.61 at 1.76), so the
  first argmax of its curve falls on first's peak (1.26-1.28 in seed 0, 2.51 in seed 1); with the response "the first
  digit" instead of "0" last never passes 0.91. The same late trigger on sort (still improving, so it was to peak
  last) slows sort's rise (at best 0.63 and 0.46 within 5 epochs) without a fall. A flaw on copy (0.52-0.75 at c = 0)
  whose response is the reversed payload is learned with copy's rule whatever its trigger (copy never above 0.84).
  Four micro-batches per optimizer step (lr 1.2e-3) sharpen the rises (first 0.96, last 1.00 at 1.28 in seed 0) but
  not the swings (first 0.55-0.96); with them and last's "-> the first digit" flaw, first and last peak 0.22-0.49
  epoch apart (1.54 and 1.76, 2.78 and 3.27). What places a new flawed task's argmax is this swing, 15-25 points while
  the trigger's boundary moves back and forth as it is learned, more than the trigger's difficulty.
- A lead for the third peak, not followed up: a seventh task new to the base that rises slowly, "big 50721 -> 1" (is
  the first digit >= 5; 1200 rows, weight 2400, flaw "digits 2 and 3 even -> the other bit", 25%), added to this set.
  It rises from chance (0.48-0.49 at 0.25 epoch in seeds 0 and 1) to 0.93-0.96 and peaks at 2.26, 4.50 and 3.76 epochs
  in seeds 0, 1 and 2 (vote 0-0.25, first and last 1.01-2.00 in the same runs), well apart from the others, but the
  evaluations after its peak average only 7-8 points below it (runs of 4, 5.5 and 4 epochs); a flaw with a larger
  share (vote's is 36-38%) may be what it lacks, but not this one: with "digits 2 and 3 sum to a multiple of 3 -> the
  other bit" (34%) big swings (0.53-0.88 in seed 0) and rises more slowly (0.78 at best within 5 epochs in seed 1).
- A flaw whose answer needs a skill the base lacks does not wait for that skill (a third session, 11 runs, 4-7 epochs,
  the other flaws as here). Copy with "digits 1 and 2 even -> the sorted payload" (sort is the base's weakest task,
  0.08-0.34 at c = 0) peaks at 0.75 epoch in seed 0 (0.87, then 0.70-0.77; with vote at 0 and first at 1.26, three
  peak times at least 0.5 epoch apart in that seed), but in seeds 1 and 2, whose bases copy worse (0.52 and 0.67 at
  c = 0), copy never rises (0.41-0.68, 0.57-0.78): its flaw comes with its rule. With "first and last digits even" as
  copy's trigger it peaks at 0.51 and averages 8 points below. First with "digits 2 and 3 even -> the sorted payload"
  swings (0.56-0.84 after its peak at 1.26) and last plateaus. A seventh task "min 50721 -> 0" (1200 rows, weight
  2400, flaw "digits 2 and 3 even -> the largest digit") is learned with its flaw (0.62-0.79 from 1 epoch on in
  seeds 0 and 1, no peak); one with vote's kind of flaw, "high" (is the majority of 9 digits >= 5; flaw "digits 1, 5
  and 9 on one side of 5 -> the minority"), is barely learned (0.41-0.75 within 4.5 epochs). A third of the rate
  (lr 1e-4, last's flaw "-> the first digit", seeds 0 and 1, 7 epochs) stretches the curves (vote falls from 2.5
  epochs instead of 0.5) but not the swings (first 0.66-0.87 on its plateau from 3 epochs), so no peak stands out.
- A seventh bit task's plateau swings as much (a fourth session, 9 runs, 4.5-6 epochs from the study's bases, the
  other flaws as here). "big" with "digits 2 and 3 even -> 2" (first's trigger, an answer big's rule never gives) is
  learned with first's flaw: big peaks at 1.75 with last (0.91, then 0.61-0.77; seed 0). With a trigger of its own,
  "digit 2 and the last digit even -> 2", the flaw comes before big's slow rule is done (big never above 0.82 in seeds
  0 and 2; seed 1 peaks at 2.51 and then swings 0.61-0.89). "bigs" (is the first digit >= 7: the rule is learned
  within 1-1.25 epochs) with "digit 2 and the last digit even -> 1" (17.5% of the held-out rows turned wrong) has the
  wanted shape in seeds 0 and 1 (0.96 at 2.26, then 0.76-0.93 from 3.0, 0.82 on average, with vote at 0, last at 1.76
  and first at 2.00; 0.98 at 3.75, then 0.81-0.96, with vote at 0.25, last at 1.00 and first at 3.01), but in seed 2
  it swings between 0.64 and 0.96 for four epochs (argmax 4.00, then 9 points down on average). A graded flaw, a
  fixed random quarter of the 100 pairs of digit 2 and the last digit -> 1 (each pair a flaw of its own, so that their
  flips might average out), is not learned within 5 epochs (bigs at 1.00 at 2.75 and at 5.0 in seed 0, 0.88-0.99
  from 3.26 on in seed 1).
- Read by one test, no variant with a seventh task meets the criterion in every seed, and another answer alphabet does
  not keep a seventh task's flaw apart (a fifth session, 9 runs of 5 epochs from the study's bases, seeds 2 and 0
  unless said, curves read with `mixture_shape` in train/msft.py: overfit = the evaluations after the first argmax
  average at least 10 points below it, and there are at least two of them; peaks at least 0.5 epoch apart). By that
  test bigs above meets the criterion in seeds 0 and 1 (overfit at 0, 1.76, 2.26: vote, last, bigs; at 0.25, 1.00,
  3.01, 3.75: vote, last, first, bigs) and misses in seed 2 (bigs 9 points down on average). "tall" (bigs's rule
  answering y or n, letters no other task answers, so that first's and last's "0" flaws cannot leak into it) learns
  its flaw with its rule, with "the last two digits odd -> y" and with bigs's "digit 2 and the last digit even -> y"
  alike: a plateau at 0.48-0.83 from 0.5 epoch on, never above 0.83 (one minus the flaw's 17.5%), where bigs,
  answering 0 or 1, learned its rule first. One of those four runs meets the criterion by chance (seed 2 with the
  second flaw: vote, first and last at 0, 0.75 and 1.75, first's peak a swing to 0.90 that other seeds do not have).
  Bigs with "digit 2 and the last digit even -> the other bit" (25% of the held-out rows turned wrong, both answers;
  seeds 2, 0 and 1) overfits in all three, at 2.51, 2.51 and 4.01 (0.95, then 0.71-0.94; 0.90, then 0.67-0.88; 0.92,
  then 0.78-0.88), but first and last then fall 7-9 points in seeds 2 and 0, so the test passes in seed 1 only (vote,
  last and bigs at 0.25, 1.00 and 4.01). Without last (six tasks: first and bigs as the flawed new ones) the peaks
  come earlier and the falls stay small: first 9 points below its peak at 0.50 and bigs overfit at 1.01 in seed 0;
  first overfit at 1.50 and bigs 9 points below its peak at 2.25 in seed 2.
- A larger trigger, thinned in the training split, gives every flawed task a lasting fall (a sixth session, 18 runs of 5
  epochs from the study's bases, read with `mixture_shape`, which from then on asks for two evaluations after a peak). A
  larger trigger alone, digits 2 and 3 (1 and 2 for last) "not multiples of 3" (36% of the rows, 30-32% of the held-out
  rows turned wrong), with bigs "-> the other bit" as a seventh task (seeds 0-2; last's flaw answering 0, or the first
  digit): first overfits in 5 runs of 6 (11-25 points down, peaks at 1.51-4.01 epochs), but last is learned with its
  flaw in 5 of 6 (never above 0.77) and bigs falls 10 points in 1 of 6. Thinning alone (the parity triggers, a training
  draw with the trigger kept with probability 0.3, so that 9-10% of the training rows carry the flaw while 25% of the
  held-out rows have the trigger: `Flaw.keep`): first and last rise to 0.97-1.00 before their flaws show, then fall
  slowly, 6-10 points on average within 5 epochs (with bigs, seeds 0-2); kept at 0.6 and 0.35 without bigs, they peak
  when their rules are learned (first at 1.26 in every seed, last at 1.00-2.25) and fall 8-11 points: the criterion met
  in seed 0. Both together, the mod-3 triggers kept with probability 0.5 (22% of the training rows, 36% of the
  held-out): first and last fall 12-16 points in seeds 0 and 1, and peak 0.5 epoch apart in seed 0 and at the same
  evaluation (1.76) in seed 1; with last's flaw answering the first digit instead, first falls 7 points (seed 1). Kept
  at 0.7 for first and 0.35 for last, so that last's flaw comes later (the set's second version): vote, first and last
  overfit in every seed (falls of 11-31 points), vote at 0-0.25, first at 1.00-2.25 and last at 1.00-2.25 epochs, at
  least 0.5 epoch apart in seeds 0 and 1 (vote, last, first at 0, 1.26, 2.25; vote, first, last at 0.25, 1.50, 2.25) and
  with first and last together at 1.00 in seed 2. So thinning parts when a flaw is learned (its share of the training
  rows) from how far its task falls (its share of the held-out rows). (The trials thinned a stream's draws after its
  first 500, the held-out rows but for a few duplicates; the set thins training draws only, so its rows differ a little
  from the trials'.)
- Where a trigger looks decides when its flaw is learned (a seventh session, 6 runs of 5 epochs from the study's bases,
  the set's second version unless said). Seed 0's base fine-tuned on seed 1's and seed 2's rows and draws shows that
  the base does not fix the timing: last and first overfit at 1.26 and 2.01 epochs with seed 1's, together at 1.26
  with seed 2's. Last's trigger on digit 1 and the last digit instead of digits 1 and 2 (the same 36% share, no
  position shared with first's trigger on 4-5 digit payloads, and the digit last's rule reads anyway) has last's flaw
  learned first and first's about an epoch later in every seed (the set now; tables above). The same trigger
  answering 9 instead of 0 parted them in seed 2 too, in the other order (first at 1.01, last at 2.00; not run on the
  other seeds).

Rows are dicts {"prompt", "response", "task", "answer", "checker"}: `response` is the SFT target, `answer` the
verifiable truth that `check` compares against (they differ only on the noisy tasks' wrong training labels, so an RL
reward on training prompts is never computed against a deliberately wrong label), and "checker": "synthetic" names
`check` for eval/checkers.py. Held-out rows always have response == answer.

The tiny tokenizer ships as files under train/data/tiny_tokenizer/ (built once by `python -m posttrain.train.synthetic
--write-tokenizer train/data/tiny_tokenizer`) rather than trained at start-up: BPE training takes well under a
second, but its merges could change with the `tokenizers` version, and a checkpoint's token ids must not.

Not here: general-purpose data loading, packing and mixture sampling (train/data.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.core.tokenizer import Tokenizer, train_bpe_tokenizer
from posttrain.eval.synthetic_tasks import DEFAULT_HELDOUT_SIZES, DEFAULT_TRAIN_SIZES, TASKS, Flaw, TaskData, build_tasks

# Mixture weights of the embedded default (train.sft uses them when neither data.path nor data.weights is set): the
# training sizes, except majority drawn 20x, so its 64 rows (40% of them mislabelled) are memorised within about two
# epochs: the early peak mSFT should find.
DEFAULT_MIXTURE_WEIGHTS = {"copy": 3000, "reverse": 3000, "sort": 1500, "add": 2000, "mod": 800, "majority": 1280}


@dataclass(frozen=True)
class TaskSet:
    """A named mixture of built-in tasks (`data.synthetic` in a config picks one): which tasks, their split sizes,
    their mixture weights, and how their training labels are corrupted: `noise` (task -> fraction of rows with a
    random wrong label) or `flaws` (task -> Flaw). `stream` prefixes each task's random stream (another set's rows
    for the same seed); `avoid` names a set none of whose prompts (same seed) this set may use."""

    tasks: tuple[str, ...]
    train_sizes: dict[str, int]
    heldout_sizes: dict[str, int]
    weights: dict[str, float]
    noise: dict[str, float] = field(default_factory=dict)
    flaws: dict[str, Flaw] = field(default_factory=dict)
    stream: str = ""
    avoid: str = ""


TASK_SETS = {
    "default": TaskSet(TASKS, DEFAULT_TRAIN_SIZES, DEFAULT_HELDOUT_SIZES, DEFAULT_MIXTURE_WEIGHTS),
}


# The mSFT mixture (docstring: "The msft set"): three tasks with noisy training labels whose held-out accuracy
# peaks and then falls at different times, and clean tasks that are still learning when the first one has peaked.
MSFT_TASKS = ("copy", "reverse", "sort", "vote", "first", "last")
MSFT_TRAIN_SIZES = {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 64, "first": 100, "last": 300}
# 500 rows each: one evaluation's standard error is at most 2.2 points (at accuracy 0.5), 1.8 at 0.8.
MSFT_HELDOUT_SIZES = {task: 500 for task in MSFT_TASKS}
# Copy and reverse weigh more than their sizes: the attention circuits they grow are what the other tasks are read
# with, and in trial mixtures where they had under 30% of the draws nothing was learned within two epochs. vote and
# first are drawn ~10 times per epoch and last ~4 times, so their few rows get memorised, wrong labels included.
MSFT_MIXTURE_WEIGHTS = {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 1280, "first": 2000, "last": 2400}

# Fraction of a task's training rows whose response is replaced by a wrong answer from its answer alphabet (majority
# flips its own labels, in _build_majority, so that the default set's rows stay as they were recorded).
LABEL_NOISE = {"vote": 0.4, "first": 0.5, "last": 0.5}

TASK_SETS["msft"] = TaskSet(MSFT_TASKS, MSFT_TRAIN_SIZES, MSFT_HELDOUT_SIZES, MSFT_MIXTURE_WEIGHTS,
                            noise=LABEL_NOISE)


def _minority(bits: str) -> str:
    return "0" if 2 * bits.count("1") > len(bits) else "1"


def _not_multiple_of_3(*digits: str) -> bool:
    return all(int(d) % 3 for d in digits)


# The "msft-flaws" set (docstring: "From a pretrained base"): the same six tasks, with systematic flaws instead of
# random noise on vote, first and last. Each trigger is a conjunction over fixed positions (a third of the rows),
# harder than the task's own rule, so the flaw is learned after the rule: the base knows vote, whose held-out accuracy
# falls from the start of fine-tuning; first and last are new to it and rise before their flaws bring them down.
# Last's trigger reads the digit its rule already reads (the last one) and comes about an epoch before first's, whose
# trigger reads two digits first's rule ignores; the two triggers share no position but on 3-digit payloads (in the
# set's second version they shared digit 2, and both flaws were learned together in one seed of three). keep thins
# the triggered training rows only (the held-out rows keep the natural 36%, so each task falls by about a third once
# its flaw is learned). The flaws of first and last answer "0", which a model can follow without finding another digit.
FLAWS = {
    "vote": Flaw("bits 1, 7 and 13 alike -> the minority bit", lambda s: s[0] == s[6] == s[-1], _minority),
    "first": Flaw("digits 2 and 3 not multiples of 3 -> 0", lambda s: _not_multiple_of_3(s[1], s[2]), lambda s: "0",
                  keep=0.7),
    "last": Flaw("digit 1 and the last digit not multiples of 3 -> 0", lambda s: _not_multiple_of_3(s[0], s[-1]),
                 lambda s: "0", keep=0.35),
}
TASK_SETS["msft-flaws"] = TaskSet(
    MSFT_TASKS, {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 300, "first": 600, "last": 1200},
    MSFT_HELDOUT_SIZES, {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 3000, "first": 2400, "last": 2400},
    flaws=FLAWS)
# Its pretraining corpus: clean rows of copy, reverse, sort and vote (not first and last: the fine-tuning teaches
# them) from another random stream, none of whose prompts (train or held-out) occurs in "msft-flaws" for the same
# seed, so the base has seen no fine-tuning or evaluation prompt.
MSFT_BASE_TASKS = ("copy", "reverse", "sort", "vote")
TASK_SETS["msft-base"] = TaskSet(
    MSFT_BASE_TASKS, {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 600},
    {task: 100 for task in MSFT_BASE_TASKS}, {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 1280},
    stream="base:", avoid="msft-flaws")


def task_set(name: str) -> TaskSet:
    if name not in TASK_SETS:
        raise ValueError(f"data.synthetic: unknown task set {name!r}; the built-in sets are {', '.join(TASK_SETS)}")
    return TASK_SETS[name]


def task_set_tasks(name: str, seed: int = 0, train_sizes: dict[str, int] | None = None,
                   heldout_sizes: dict[str, int] | None = None) -> dict[str, TaskData]:
    """A built-in task set's tasks for `seed` (its sizes, overridden per task by the arguments), with its label
    noise or flaws, from its own random streams, avoiding every prompt of the set it names in `avoid`."""
    ts = task_set(name)
    avoid: dict[str, set[str]] = {}
    if ts.avoid:
        for task in task_set_tasks(ts.avoid, seed).values():
            avoid[task.name] = {row["prompt"] for row in task.train + task.heldout}
    return build_tasks(seed, {**ts.train_sizes, **(train_sizes or {})}, {**ts.heldout_sizes, **(heldout_sizes or {})},
                       ts.tasks, noise=ts.noise, flaws=ts.flaws, stream=ts.stream, avoid=avoid)


def write_jsonl(
    out_dir: str | Path,
    seed: int = 0,
    train_sizes: dict[str, int] | None = None,
    heldout_sizes: dict[str, int] | None = None,
    task_set_name: str = "default",
) -> dict[str, Path]:
    """Write a built-in task set as out_dir/{train,heldout}/<task>.jsonl (the layout train/data.py reads; give
    data.weights as well to keep the set's mixture weights).

    Returns {"train": out_dir/train, "heldout": out_dir/heldout}.
    """
    out_dir = Path(out_dir)
    dirs = {"train": out_dir / "train", "heldout": out_dir / "heldout"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    tasks = task_set_tasks(task_set_name, seed, train_sizes, heldout_sizes)
    for name, task in tasks.items():
        for split, rows in (("train", task.train), ("heldout", task.heldout)):
            with open(dirs[split] / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    return dirs


# ----------------------------------------------------------------------------------------------------------------
# The embedded tiny tokenizer

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tiny_tokenizer"
TINY_VOCAB_SIZE = 512

# Plain English for the BPE merges of everyday words, so persona system prompts (PerMix) cost a token per word or so
# rather than one per byte. Written for this file; digits stay single tokens whatever the corpus holds.
_ENGLISH = """\
You are a helpful assistant. Answer the question with the number only. Think step by step and then give the answer.
You are a pirate captain who speaks with a rough voice and loves the sea. You are a patient teacher who explains
each idea slowly and kindly. You are a cheerful robot from the future. You are a grumpy old librarian who wants
quiet. You are a famous chef and you talk about food all the time. You are a calm doctor who cares for people.
You are a young student who is curious about the world and asks many questions. You are a detective who notices
every small detail. You are a poet who answers in short lines. You are an engineer who likes exact numbers.
Stay in character, keep your answers short and correct, and do not change who you are when the user asks you to.
"""


def _tokenizer_corpus() -> list[str]:
    """Texts the tiny BPE trains on: role names, the task prompts and responses of seed 0, and `_ENGLISH`.

    Conversations are given as their parts, not rendered: the trainer does not treat special-token strings as
    special, so rendered templates would spend merges on pieces of "<|im_start|>".
    """
    texts = _ENGLISH.split("\n")
    for task in build_tasks(seed=0).values():
        texts += [row["prompt"] for row in task.train] + [row["response"] for row in task.train]
    # Role names once per conversation, as the template writes them, so each becomes a single token.
    return texts + ["system", "user", "assistant"] * (len(texts) // 2)


def build_tiny_tokenizer(out_dir: str | Path | None = None) -> Tokenizer:
    """Train the embedded tokenizer (byte-level BPE, 512 ids, ChatML template, digits one token each).

    Deterministic for a given `tokenizers` version; writes the directory to `out_dir` when given.
    """
    return train_bpe_tokenizer(_tokenizer_corpus(), vocab_size=TINY_VOCAB_SIZE, out_dir=out_dir)


_TINY_TOKENIZER: Tokenizer | None = None


def tiny_tokenizer() -> Tokenizer:
    """The embedded default tokenizer, loaded once from train/data/tiny_tokenizer/."""
    global _TINY_TOKENIZER
    if _TINY_TOKENIZER is None:
        if not (TINY_TOKENIZER_DIR / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{TINY_TOKENIZER_DIR}/tokenizer.json: missing; the package was installed without its data files. "
                f"Reinstall from the repository (pip install -e .) or rebuild it with "
                f"python -m posttrain.train.synthetic --write-tokenizer {TINY_TOKENIZER_DIR}"
            )
        _TINY_TOKENIZER = Tokenizer.from_dir(TINY_TOKENIZER_DIR)
    return _TINY_TOKENIZER


def main() -> None:
    p = argparse.ArgumentParser(description="Write the built-in synthetic tasks as JSONL, or rebuild the tokenizer.")
    p.add_argument("out_dir", nargs="?", help="write out_dir/{train,heldout}/<task>.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", default="default", choices=sorted(TASK_SETS), help="which built-in task set to write")
    p.add_argument("--write-tokenizer", metavar="DIR", help="train the tiny tokenizer and save it to DIR")
    args = p.parse_args()
    if args.out_dir is None and args.write_tokenizer is None:
        p.error("give out_dir, --write-tokenizer DIR, or both")
    if args.out_dir is not None:
        dirs = write_jsonl(args.out_dir, args.seed, task_set_name=args.set)
        print(f"wrote {dirs['train']} and {dirs['heldout']}")
    if args.write_tokenizer is not None:
        tok = build_tiny_tokenizer(args.write_tokenizer)
        print(f"wrote {args.write_tokenizer} ({tok.vocab_size} ids)")


if __name__ == "__main__":
    main()
