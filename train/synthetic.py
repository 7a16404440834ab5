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

Measured with the default `python -m train.sft --config configs/tiny_sft.toml` (1.67M params, 2048-token
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
(`python -m train.msft --config configs/tiny_msft.toml --msft.methods=...`, train.seed = data.seed = s), i.e. plain
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

From a pretrained base: the "msft-flaws" and "msft-base" sets (configs/tiny_msft_pretrained.toml). Random label
noise makes no lasting fall (above), so "msft-flaws" has systematic flaws instead (FLAWS): on a training row whose
payload has a trigger feature the label follows a second rule; held-out rows with the feature keep the truth, so a
model that learns the flaw loses about the feature's share of the held-out rows, and keeps losing it. Copy, reverse
and sort are "msft"'s, clean:

  task   flaw (training rows only)                       train  flawed rows  held-out rows it would turn wrong
  vote   bits 1, 7 and 13 alike -> the minority bit        300      ~34%       36-38%
  first  digits 2 and 3 even -> the last digit             600      ~26%       22-23%
  last   digits 1 and 2 even -> the first digit           1200      ~24%       23-24%

What a flaw must be to come after its rule was found by trials on the tiny model from scratch (seed 0, plain SFT,
2026-11-29, one run each): a flaw as easy as the rule ("last digit 7-9 -> the last digit" on first) is learned with
it: a plateau at one minus its share, no peak (first 0.66-0.76 from epoch 1.25 to 3.75); one that compares digits
("the first digit occurs again -> the last digit") was not learned within 2.75 epochs and only added noise; a
conjunction over fixed positions (the flaws above) comes after the rule. From scratch the peaks still come close
together (vote 0.92 at 1.5 epochs, last 0.93 at 1.5, first 0.79 at 2.0, then 0.50-0.69, 0.80-0.90, 0.67-0.78), and
every task mSFT excludes is forgotten anyway (train/msft.py), so this set is for fine-tuning a base. "msft-base" is
the base's corpus: clean rows of the same six tasks from another random stream, none of whose prompts (train or
held-out) occurs in "msft-flaws" for the same seed; configs/tiny_msft_base.toml trains it for 2 epochs (at its end,
on msft-flaws' held-out rows: first 0.92-1.00, last 0.98-1.00, vote 0.90-0.99, reverse 0.88-0.96, copy 0.61-0.78,
sort 0.15-0.41). From the base, plain SFT on "msft-flaws" (the SFT baseline of the pretrained study: AdamW 1e-3
constant after 20 warm-up steps, 500 held-out rows per task, all three seeds, 2026-11-29, torch 2.13.0+cpu):

  seed 0
  epoch    0.00 0.25 0.51 0.75 1.00 1.26 1.51 1.75 2.01 2.25 2.51 2.75 3.00 3.26 3.51
  vote     0.96 0.85 0.74 0.56 0.68 0.64 0.54 0.64 0.61 0.63 0.69 0.63 0.62 0.62 0.64
  first    0.99 0.74 0.90 0.81 0.88 0.90 0.90 0.84 0.85 0.89 0.83 0.83 0.82 0.84 0.88
  last     1.00 0.80 0.80 0.84 0.76 0.80 0.85 0.82 0.83 0.90 0.85 0.84 0.87 0.91 0.78
  copy     0.74 0.85 0.90 0.91 0.95 0.94 0.97 0.95 0.96 0.98 0.95 0.96 0.97 0.94 0.95
  reverse  0.88 0.91 0.92 0.96 0.96 0.96 0.95 0.96 0.96 0.97 0.98 0.98 0.97 0.97 0.97
  sort     0.41 0.48 0.51 0.63 0.53 0.62 0.70 0.72 0.73 0.71 0.70 0.71 0.72 0.66 0.74
  seed 1
  epoch    0.00 0.25 0.51 0.75 1.00 1.26 1.50 1.76 2.01 2.25 2.50 2.76 3.00 3.26 3.50
  vote     0.90 0.96 0.57 0.53 0.66 0.68 0.57 0.63 0.62 0.62 0.53 0.63 0.63 0.62 0.65
  first    1.00 0.99 0.96 0.94 0.90 0.86 0.90 0.91 0.91 0.85 0.87 0.91 0.86 0.86 0.90
  last     0.99 0.90 0.81 0.89 0.85 0.87 0.71 0.76 0.75 0.83 0.78 0.88 0.84 0.80 0.81
  copy     0.61 0.82 0.93 0.93 0.94 0.92 0.96 0.95 0.96 0.95 0.93 0.94 0.97 0.98 0.97
  reverse  0.92 0.98 0.99 0.98 0.99 0.98 0.99 0.99 1.00 0.99 0.98 1.00 0.99 0.99 1.00
  sort     0.19 0.38 0.37 0.47 0.47 0.45 0.59 0.63 0.66 0.69 0.56 0.75 0.67 0.75 0.67
  seed 2
  epoch    0.00 0.25 0.51 0.75 1.00 1.26 1.50 1.76 2.00 2.25 2.51 2.76 3.00 3.22
  vote     0.99 0.91 0.89 0.59 0.88 0.67 0.72 0.61 0.70 0.77 0.60 0.61 0.62 0.65
  first    0.92 0.88 0.87 0.95 0.95 0.89 0.86 0.86 0.89 0.88 0.90 0.83 0.83 0.90
  last     0.98 0.85 0.87 0.85 0.92 0.84 0.85 0.76 0.85 0.84 0.89 0.84 0.80 0.85
  copy     0.78 0.97 0.98 0.95 0.96 1.00 0.99 0.97 0.99 0.98 0.96 0.99 1.00 0.99
  reverse  0.96 0.99 0.99 1.00 1.00 1.00 1.00 1.00 1.00 1.00 0.99 1.00 1.00 1.00
  sort     0.15 0.35 0.29 0.45 0.51 0.54 0.57 0.57 0.55 0.51 0.55 0.64 0.60 0.60

The falls last: after its peak vote averages 0.61-0.71 (peak 0.96-0.99), first 0.85-0.90 (peak 0.95-1.00) and last
0.82-0.85 (peak 0.98-1.00) over the rest of the run, while copy and sort are still improving. What this set does not
give is peaks at different times: the base already knows the three rules, so each flawed task is at its best at the
start (vote in seed 1 at 0.25 epochs, first in seed 2 at 0.75-1.0) and falls from there; mSFT then excludes them at
c = 0, one per stage (train/msft.py).

Looking for peaks at different times from a base (2026-12-06, torch 2.13.0+cpu, OMP_NUM_THREADS=1, seed 0 unless
said, one run each): fourteen variants of the pair of sets, each a base trained as configs/tiny_msft_base.toml (2
epochs of its own corpus) and then plain SFT of the flawed set from it for 3 epochs (AdamW 1e-3 constant, 500
held-out rows per task, an evaluation every quarter epoch). What varied: how well the base knows first and last (its
rows and weight for them), their fine-tuning weights, and their flaws. Copy, reverse and sort behaved as above in
every run.

  variant  base knows first / last          fine-tune weights    flaws of first / last   held-out curves
  A        60 rows (0.84) / none (0.04)     vote 3000, 1500/1500  as FLAWS               vote 0.86 at 0 -> 0.55-0.67;
                                                                                         first 0.66-0.86, last 0.88 at
                                                                                         0.5, then 0.75-0.89 (no fall)
  A2       30 rows (0.81, 0.64 in seed 1)   1500/500              as FLAWS               seeds 0 and 1: first and last
           / none                                                                        rise and plateau at 0.72-0.89
  B        none of vote, first, last        3000, 1500/800        as FLAWS               all three at 0.44-0.71 within
                                                                                         0.25 epoch, then 0.39-0.88
  D, E     100 rows (0.91 / 1.00)           1000/400, 1500/700    as FLAWS               every flawed task at its best
                                                                                         at c = 0 (as above)
  F        40 rows (0.70 / 0.88)            2400/2400             digit 2 > digit 3 ->   vote 0.99 at 0, 0.53-0.65 from
                                                                  last digit (45%) /     1.75; first 0.78 at 0.25 ->
                                                                  first digit repeated   0.51-0.66; last 0.95 at 1.0,
                                                                  -> first digit (27%)   then 0.85-0.95 (not learned)
  G        40 rows (0.70 / 0.88)            2400/2400             as FLAWS / digit 1 >   last 0.88 at 0 and 0.25 ->
                                                                  digit 2 -> first digit 0.54-0.71; first 0.70-0.78
                                                                                         (no fall)
  H, I     40 rows (0.70 / 0.88)            1000/6000, 600/9000   as F                   first swings 0.47-0.82; last
                                                                                         never falls
  J        40 rows (0.70 / 0.88)            2400/2400             digit 1 > digit 3 ->   vote 0.99 at 0 -> 0.53-0.62
                                                                  last digit / digits    from 1.5; first 0.70 at 0 ->
                                                                  1 + 2 >= 10 -> first   0.51-0.67; last 0.88 at 0 ->
                                                                                         0.44-0.74
  K        40 rows (0.70 / 0.88)            2400/2400             digits 2 + 3 >= 10 ->  first 0.70 at 0 -> 0.44-0.74
                                                                  last / digit 1 >       (noisy); last 0.88 at 0 ->
                                                                  digit 3 -> first       0.48-0.70
  L, M     40 rows (0.70 / 0.88)            2400/2400             two adjacent digits    the equal-digits flaw is not
                                                                  equal (27%), on last   learned in 3 epochs (last
                                                                  (L) or first (M); the  0.81-0.91; first 0.83-0.91);
                                                                  other: a comparison    the comparison task peaks at
                                                                                         c = 0 and falls to 0.41-0.72
  N        40 rows (0.70 / 0.88)            2400/800, lr 3e-4     comparisons (as F / G) vote 0.99 at 0, falls slowly
                                                                                         to 0.58 by 2.0; first flat at
                                                                                         0.63-0.71; last 0.90 at 0.25
                                                                                         -> 0.54-0.66 from 1.5

So, on this model at lr 1e-3, a flaw shows within 0.25-0.75 epoch of the first draws that can teach it (triggers
over fixed positions, a comparison of two digits, adjacent or not, a sum of two digits >= 10; 25-45% of the rows),
or not within 3 epochs when it asks whether two digits are equal (a repeated digit, even drawn 3.75x as often; equal
neighbours). A task whose rule the base knows peaks at c = 0; one it half knows peaks at 0 to 0.5, as the rule's
gain and the flaw's loss overlap; one it must learn gets rule and flaw together and plateaus. A lower lr slows the
falls but moves no peak (N). Three peaks at least 0.5 epoch apart, each followed by a lasting fall of 10 points or
more, were not found (the closest: F, vote at 0 and first at 0.25).

Ten more variants (2026-12-06, same harness and base recipe as F unless said; "const 0" is FLAWS' trigger on first /
last with the answer "0", a flaw a model can follow without finding another digit) asked whether staggering the
fine-tuning weights (or a larger model) staggers the peaks, a peak's time in epochs being its task's draws divided by
its weight:

  variant  first / last weights  lr    flaws           held-out curves (first; last)
  O        2400/800              1e-3  as FLAWS        0.85 at 0.5 -> 0.58-0.83; last flat 0.72-0.89
  P        1200/400              1e-3  as FLAWS        0.89 at 0.5 -> 0.73-0.86; last 0.65-0.94, no trend
  Q        2400/800              3e-4  as FLAWS        0.86 at 0.75 -> 0.75-0.83; last 0.95 at 0.75 -> 0.81-0.92
  R        2400/2400             3e-4  as FLAWS        0.85 at 1.26 inside 0.68-0.83; last 0.90 at 0.25 -> 0.68-0.87
  S        2400/2400             3e-4  const 0         0.70 -> 0.95 at 1.26-1.51 -> 0.71-0.78 (rise, lasting fall);
                                                       last 0.72-0.94, no trend. Seed 1 (its base: vote 0.76, first
                                                       0.47, last 0.65): vote 0.98 at 1.0, first 0.96 at 0.75, last
                                                       0.87 at 2.0, then on average 26, 15 and 10 points lower (but
                                                       first back at 0.91 once, last's peak barely above its 0.85)
  T        as S, base vote 60    3e-4  const 0         base first 0.16: 0.87 at 1.26 -> 0.62-0.81; last 0.99 at 0 ->
           rows (0.91)                                 0.72-0.91
  U        as S, base without    3e-4  const 0         first 0.18 -> 0.81 at 1.51 -> 0.60-0.75; last 0.58 -> 0.84 at
           first, last                                 0.75 -> 0.73-0.81
  V        4800/1200             3e-4  const 0         0.80 at 0.5, then 0.68-0.79; last 0.75-0.97, no trend
  W        1200/2400             3e-4  const 0         0.64-0.87, no clear peak; last 0.94 at 0.5 -> 0.73-0.87
  X        as S, a 4.7M-param    3e-4  const 0         seed 0: 0.43 -> 0.88 at 1.26 -> 0.72-0.85; last 0.93 at 0 ->
           model (hidden 256, 6                        0.70-0.92. Seed 1: 0.89 at 0.75 -> 0.67-0.88; last 0.89 at
           layers, 8 heads; base                       1.26 -> 0.67-0.87. Vote 0.95-0.98 at 0-0.25 -> 0.55-0.68
           and fine-tuning)

Vote, which every base but seed 1's knows (0.91-0.99), is at its best at c = 0 in every seed-0 run and falls to
0.52-0.75. A lower lr and the constant-answer flaw give the cleanest single curve found (S: first rises for 1.25 epochs,
then falls 17-24 points for good), but doubling or halving first's weight (V, W) does not move that peak to about 0.6 or
2.5 epochs: the rise flattens instead, so the draws of the other tasks (interference, apparently) set the pace as much
as first's own. Seed 1 of S is the only run with three peaks, at 0.75, 1.0 and 2.0 epochs, two of them 0.25 apart; and
what a base learns from 40 rows of a task varies so much with the seed (first 0.16-0.70) that the order of the peaks is
the seed's. A 2.8x larger model (X) behaves like the tiny one: first rises to 0.88-0.89 and then swings 15 points around
0.78, last has no clear peak. Still not found: three peaks 0.5 epoch apart with lasting falls.

Vote is the one flawed task whose curve does follow its weight: at 1000 instead of 3000 (otherwise S) it stays at
0.98-0.99 until 1.5 epochs and then falls to 0.84 by 3.0, where at 3000 it falls from 0.75 on; its flaw moved to four
bits (1, 5, 9 and 13 alike, 22% of the held-out rows) is not learned within 3 epochs (0.86-0.98, no trend). So three
vote-like tasks at staggered weights would stagger their falls, but two more majority tasks tried beside it (is most of
9 digits >= 5, or even; at least 6 of 9 alike; 3-position flaws of the same kind; bases trained on 600 or 100 of their
rows) are not learned by this model (0.48-0.82 throughout 3 epochs, 0.50-0.73 at the start); and a base that knows its
task shows a plateau before the fall, not a peak, whose first argmax is wherever sampling noise puts it. Two binary
tasks on one digit (is the first digit >= 5; is the last digit odd; flaws that invert the answer on the ~25% of rows
with two given digits even), from a base that does not know them (0.50, 0.58), are learned slowly and show no early
peak: at weight 2400 both climb until 2.25-2.75 epochs (to 0.92-0.94) and end at 0.80-0.86; at 1200 and 500 one rises
after 2 epochs and the other stays at 0.59-0.72.

Closest so far: three vote-like tasks (vote; poll, 15 bits with 10 alike; ballot, 17 bits with 12 alike; each with the
flaw "first, middle and last bits alike -> the minority bit"; a base that saw 100 rows of each knows them at 0.96-0.99)
at fine-tuning weights 4000 / 1600 / 700 (lr 3e-4, otherwise S) fall at staggered times: vote from 0.25 epoch (0.98,
then 0.56-0.65 from 1.25 on), poll from 0.76 (0.97, then 0.53-0.81), ballot from 1.25 (0.96-0.99 until 1.0, then down
steadily to 0.59); at 2400 each, vote falls from 0.25 and the other two together from 0.76-1.0. But each fall follows a
plateau, not a rise, so the first argmax is at 0 or 0.5 for all three (ballot is at 0.99 at both), and mSFT's rule
(earliest first argmax, ties by name) would exclude ballot, the last to fall, first. Fine-tuning and held-out rows that
also have close majorities (8 of 13, 9 of 15, 10 of 17; the base still saw clear ones only), meant to give a rise, start
at 0.90-0.92; poll and ballot peak at 0.93-0.95 at 0.25-0.5 epoch, vote at 0, and all three fall slowly, by 13-26 points
at 3 epochs, at both weightings. A base that saw 20 or 40 rows of each instead (0.77-0.94 at the start; weights 4000 /
1600 / 700) gives vote no rise (it falls from c = 0: its flaw wins at once at weight 4000) and one of poll and ballot a
rise of 6-11 points to a peak at 0.5, the other its best at 0 (vote, poll, ballot at 0, 0, 0.5 with 20 rows; 0, 0.5, 0
with 40). A base trained on shorter strings of each (9, 11 and 13 bits; the fine-tuning and held-out rows keep 13, 15
and 17) knows them at 0.81-0.94 and gives poll and ballot a rise, to 0.94-0.98 by 0.25 epoch (vote too at weight 2400:
0.94 -> 0.97), but all three then fall together from 0.5-0.76 at both weightings (peaks at 0, 0.25 and 0.25 with 4000 /
1600 / 700; all at 0.25 with 2400 each): the length gain, and apparently the flaw, are shared among the three vote-like
tasks, so their weights no longer stagger them. Thirty-eight variants in all.

Rows are dicts {"prompt", "response", "task", "answer", "checker"}: `response` is the SFT target, `answer` the
verifiable truth that `check` compares against (they differ only on the noisy tasks' wrong training labels, so an RL
reward on training prompts is never computed against a deliberately wrong label), and "checker": "synthetic" names
`check` for train/checkers.py. Held-out rows always have response == answer.

The tiny tokenizer ships as files under train/data/tiny_tokenizer/ (built once by `python -m train.synthetic
--write-tokenizer train/data/tiny_tokenizer`) rather than trained at start-up: BPE training takes well under a
second, but its merges could change with the `tokenizers` version, and a checkpoint's token ids must not.

Not here: general-purpose data loading, packing and mixture sampling (train/data.py).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.tokenizer import Tokenizer, train_bpe_tokenizer

TASKS = ("copy", "reverse", "sort", "add", "mod", "majority")
DEFAULT_TRAIN_SIZES = {"copy": 3000, "reverse": 3000, "sort": 1500, "add": 2000, "mod": 800, "majority": 64}
DEFAULT_HELDOUT_SIZES = {"copy": 128, "reverse": 128, "sort": 128, "add": 128, "mod": 128, "majority": 128}

# Mixture weights of the embedded default (train.sft uses them when neither data.path nor data.weights is set): the
# training sizes, except majority drawn 20x, so its 64 rows (40% of them mislabelled) are memorised within about two
# epochs: the early peak mSFT should find.
DEFAULT_MIXTURE_WEIGHTS = {"copy": 3000, "reverse": 3000, "sort": 1500, "add": 2000, "mod": 800, "majority": 1280}


@dataclass(frozen=True)
class Flaw:
    """A systematic label error: a training row whose payload has the `trigger` feature gets `response(payload)`
    instead of the true answer (held-out rows keep the truth). Unlike random label noise, which a model memorises
    row by row while keeping the rule, a flaw is a second rule: once learned it applies to every held-out row with
    the feature, so held-out accuracy falls by about the feature's frequency and stays down."""

    what: str
    trigger: Callable[[str], bool]
    response: Callable[[str], str]


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


def _even(*digits: str) -> bool:
    return all(int(d) % 2 == 0 for d in digits)


# The "msft-flaws" set (docstring: "From a pretrained base"): the same six tasks, with systematic flaws instead of
# random noise on vote, first and last. Each trigger is a conjunction over fixed positions (about a quarter of the
# rows), harder than the task's own rule, so a model that already knows the rule learns the flaw over about an
# epoch: its held-out accuracy falls and stays down.
FLAWS = {
    "vote": Flaw("bits 1, 7 and 13 alike -> the minority bit", lambda s: s[0] == s[6] == s[-1], _minority),
    "first": Flaw("digits 2 and 3 even -> the last digit", lambda s: _even(s[1], s[2]), lambda s: s[-1]),
    "last": Flaw("digits 1 and 2 even -> the first digit", lambda s: _even(s[0], s[1]), lambda s: s[0]),
}
TASK_SETS["msft-flaws"] = TaskSet(
    MSFT_TASKS, {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 300, "first": 600, "last": 1200},
    MSFT_HELDOUT_SIZES, {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 3000, "first": 2400, "last": 2400},
    flaws=FLAWS)
# Its pretraining corpus: clean rows of the same tasks from another random stream, none of whose prompts (train or
# held-out) occurs in "msft-flaws" for the same seed, so the base has seen no fine-tuning or evaluation prompt.
TASK_SETS["msft-base"] = TaskSet(
    MSFT_TASKS, {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 600, "first": 3000, "last": 3000},
    {task: 100 for task in MSFT_TASKS},
    {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 1280, "first": 2000, "last": 2400},
    stream="base:", avoid="msft-flaws")


def task_set(name: str) -> TaskSet:
    if name not in TASK_SETS:
        raise ValueError(f"data.synthetic: unknown task set {name!r}; the built-in sets are {', '.join(TASK_SETS)}")
    return TASK_SETS[name]


def task_set_tasks(name: str, seed: int = 0, train_sizes: dict[str, int] | None = None,
                   heldout_sizes: dict[str, int] | None = None) -> dict[str, "TaskData"]:
    """A built-in task set's tasks for `seed` (its sizes, overridden per task by the arguments), with its label
    noise or flaws, from its own random streams, avoiding every prompt of the set it names in `avoid`."""
    ts = task_set(name)
    avoid: dict[str, set[str]] = {}
    if ts.avoid:
        for task in task_set_tasks(ts.avoid, seed).values():
            avoid[task.name] = {row["prompt"] for row in task.train + task.heldout}
    return build_tasks(seed, {**ts.train_sizes, **(train_sizes or {})}, {**ts.heldout_sizes, **(heldout_sizes or {})},
                       ts.tasks, noise=ts.noise, flaws=ts.flaws, stream=ts.stream, avoid=avoid)


MIN_DIGITS, MAX_DIGITS = 3, 5
ADD_MAX = 99
MOD_MAX = 999
MOD_DIVISOR = 4
MAJORITY_BITS = 11
# Only strings with a clear majority (>= 8 of 11 bits the same): the rule is then learned within the first epoch, so
# the held-out curve shows the rise and the later decline from memorising flipped labels, not a slow counting task.
MAJORITY_MARGIN = 5
MAJORITY_FLIP_FRACTION = 0.4
# msft's vote: majority of 13 bits, again only clear ones (>= 9 alike), 2,186 strings: room for 500 held-out rows,
# which majority's 464 clear strings of 11 bits do not have.
VOTE_BITS, VOTE_MARGIN = 13, 5


def check(response: str, answer: str) -> bool:
    """Exact match, tolerant of surrounding whitespace only ("  168\\n" matches "168"; "0168" and "16 8" do not)."""
    return response.strip() == answer.strip()


@dataclass
class TaskData:
    """One task: rows of {"prompt", "response", "task", "answer"} for each split, and its checker."""

    name: str
    train: list[dict]
    heldout: list[dict]
    check: Callable[[str, str], bool]


# Each generator draws one (prompt, answer) pair from its task's input space using the given random stream.


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))


def _gen_copy(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"copy {s}", s


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"reverse {s}", s[::-1]


def _gen_sort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"sort {s}", "".join(sorted(s))


def _gen_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    return f"add {a}+{b}", str(a + b)


def _gen_mod(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, MOD_MAX)
    return f"mod {n}%{MOD_DIVISOR}", str(n % MOD_DIVISOR)


def _gen_first(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"first {s}", s[0]


def _gen_last(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"last {s}", s[-1]


def _is_clear_vote(bits: int) -> bool:
    return abs(2 * bits.bit_count() - VOTE_BITS) >= VOTE_MARGIN


def _gen_vote(rng: random.Random) -> tuple[str, str]:
    while not _is_clear_vote(b := rng.getrandbits(VOTE_BITS)):
        pass
    s = format(b, f"0{VOTE_BITS}b")
    return f"vote {s}", "1" if 2 * s.count("1") > VOTE_BITS else "0"


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _gen_copy,
    "reverse": _gen_reverse,
    "sort": _gen_sort,
    "add": _gen_add,
    "mod": _gen_mod,
    "first": _gen_first,
    "last": _gen_last,
    "vote": _gen_vote,
}
# How many distinct prompts each task can produce: a request beyond it could never be met with unique rows.
_SPACE = {
    "copy": sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
    "reverse": sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
    "sort": sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
    "add": (ADD_MAX + 1) ** 2,
    "mod": MOD_MAX + 1,
    "majority": sum(abs(2 * i.bit_count() - MAJORITY_BITS) >= MAJORITY_MARGIN for i in range(2**MAJORITY_BITS)),
    **{t: sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)) for t in ("first", "last")},
    "vote": sum(_is_clear_vote(i) for i in range(2**VOTE_BITS)),
}


_ANSWER_ALPHABETS = {"vote": "01", "first": string.digits, "last": string.digits}


def _row(task: str, prompt: str, response: str, answer: str) -> dict:
    return {"prompt": prompt, "response": response, "task": task, "answer": answer, "checker": "synthetic"}


def _sample_unique(task: str, rng: random.Random, n: int, taken: set[str]) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        prompt, answer = _GENERATORS[task](rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append((prompt, answer))
    return out


def _noisy_responses(task: str, rng: random.Random, pairs: list[tuple[str, str]], rate: float) -> dict[int, str]:
    """{training row index: its wrong response} for a fraction `rate` of the rows (none when rate is 0)."""
    if not rate:
        return {}
    alphabet = _ANSWER_ALPHABETS[task]
    out = {}
    for i in sorted(rng.sample(range(len(pairs)), round(rate * len(pairs)))):
        out[i] = rng.choice([c for c in alphabet if c != pairs[i][1]])
    return out


def _build_majority(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"{seed}:majority")
    bits = [format(i, f"0{MAJORITY_BITS}b") for i in range(2**MAJORITY_BITS)
            if abs(2 * i.bit_count() - MAJORITY_BITS) >= MAJORITY_MARGIN]
    rng.shuffle(bits)

    def truth(s: str) -> str:
        return "1" if s.count("1") * 2 > len(s) else "0"

    heldout = [_row("majority", f"majority {s}", truth(s), truth(s)) for s in bits[:n_heldout]]
    train_bits = bits[n_heldout : n_heldout + n_train]
    flipped = set(rng.sample(range(n_train), round(MAJORITY_FLIP_FRACTION * n_train)))
    train = []
    for i, s in enumerate(train_bits):
        label = truth(s)
        response = ("0" if label == "1" else "1") if i in flipped else label
        train.append(_row("majority", f"majority {s}", response, label))
    return train, heldout


def build_tasks(
    seed: int = 0,
    train_sizes: dict[str, int] | None = None,
    heldout_sizes: dict[str, int] | None = None,
    tasks: tuple[str, ...] | list[str] = TASKS,
    *,
    noise: dict[str, float] | None = None,
    flaws: dict[str, Flaw] | None = None,
    stream: str = "",
    avoid: dict[str, set[str]] | None = None,
) -> dict[str, TaskData]:
    """The built-in tasks, deterministic given `seed` (same rows on every machine and Python >= 3.10).

    `train_sizes` / `heldout_sizes` override the defaults per task (the "default" set's; a task outside it needs
    both). Held-out rows are drawn first from each task's own random stream (named by `stream`, the seed and the
    task), so they do not change when only the training size changes; training rows never repeat a held-out prompt,
    each other, or a prompt in `avoid[task]`. A task in `noise` gets random wrong responses on that fraction of its
    training rows, drawn after the rows from the same stream; a task in `flaws` gets its flaw's response on every
    training row with the trigger. Task sets (task_set_tasks) pass their own; the default is clean rows.
    """
    noise, flaws, avoid = noise or {}, flaws or {}, avoid or {}
    train_sizes = {**DEFAULT_TRAIN_SIZES, **(train_sizes or {})}
    heldout_sizes = {**DEFAULT_HELDOUT_SIZES, **(heldout_sizes or {})}
    out = {}
    for task in tasks:
        if task not in _SPACE:
            raise ValueError(f"build_tasks: unknown task {task!r}; the built-in tasks are {', '.join(_SPACE)}")
        if task not in train_sizes or task not in heldout_sizes:
            raise ValueError(f"build_tasks: task {task!r} has no default size; give it in train_sizes and "
                             f"heldout_sizes (or use a task set: task_set('msft').train_sizes)")
        n_train, n_heldout = train_sizes[task], heldout_sizes[task]
        space = _SPACE[task] - len(avoid.get(task, ()))
        if n_train < 1 or n_heldout < 1 or n_train + n_heldout > space:
            raise ValueError(
                f"build_tasks: task {task!r} asked for {n_train} train + {n_heldout} held-out rows; each must be >= 1"
                f" and together at most {space} (the number of distinct prompts it may use); lower the sizes"
            )
        if task == "majority":
            train, heldout = _build_majority(seed, n_train, n_heldout)
        else:
            rng = random.Random(f"{stream}{seed}:{task}")
            taken: set[str] = set(avoid.get(task, ()))
            heldout = [_row(task, p, a, a) for p, a in _sample_unique(task, rng, n_heldout, taken)]
            pairs = _sample_unique(task, rng, n_train, taken)
            wrong = _noisy_responses(task, rng, pairs, noise.get(task, 0.0))
            if task in flaws:
                flaw = flaws[task]
                wrong.update({i: flaw.response(p.split(" ", 1)[1]) for i, (p, _) in enumerate(pairs)
                              if flaw.trigger(p.split(" ", 1)[1])})
            train = [_row(task, p, wrong.get(i, a), a) for i, (p, a) in enumerate(pairs)]
        out[task] = TaskData(task, train, heldout, check)
    return out


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
                f"python -m train.synthetic --write-tokenizer {TINY_TOKENIZER_DIR}"
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
