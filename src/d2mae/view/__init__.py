"""``d2mae view``: static pages to look through a run's images, blur searches and predictions (:mod:`.page`)."""
