"""One module per kind of page of the site; each renders its pages through report.site.Site."""
