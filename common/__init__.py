"""Small pieces shared by `policy`, `reward` and `annotation`, which do not import each other."""
