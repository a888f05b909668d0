"""qa-finetune: fine-tune DistilBERT-style models for extractive question answering."""
