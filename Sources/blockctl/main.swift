print("blockctl")
