"""Retrieval fine-tuning losses, one per file (the sentence-transformers layout):

  * `OrthogonalProjectionLoss` (the M2-BERT paper's single-sample loss), on embeddings;
  * `MultipleNegativesRankingLoss` (the contrastive baseline), on embeddings;
  * `CachedMultipleNegativesRankingLoss` (the same loss at any batch size in the memory of one mini-batch,
    by gradient caching): it runs the encoder itself, so it takes the model and tokenized inputs.

All compare embeddings by cosine similarity, computed in float32 whatever precision the encoder runs in.
"""

from .cached_multiple_negatives_ranking import CachedLossOutput, CachedMultipleNegativesRankingLoss, RandomState
from .multiple_negatives_ranking import MultipleNegativesRankingLoss
from .orthogonal_projection import OrthogonalProjectionLoss

__all__ = ["CachedLossOutput", "CachedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
           "OrthogonalProjectionLoss", "RandomState"]
