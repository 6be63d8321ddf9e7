"""The FAISS index, the ranking metrics and the one recommender path (validation, batch evaluation and serving all call it)."""
