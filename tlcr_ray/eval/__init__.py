"""Evaluation: held-out discriminator/RM accuracy, the Fig. 6 reward table, MT-Bench/AlpacaEval and the report."""
