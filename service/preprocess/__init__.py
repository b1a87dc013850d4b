"""Input pipelines that belong to a model: images to the tensors its architecture takes."""
