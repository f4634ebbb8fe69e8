"""RenderService (selma.v1.RenderService): renders prompt sets into image datasets with diffusers pipelines."""
