"""PromptService (selma.v1.PromptService): skill-specific prompt generation with an LLM and a ROUGE-L diversity filter."""
