"""Looking at the features: massive-activation statistics, figures, the segmentation probe."""
