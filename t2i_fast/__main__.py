from t2i_fast.cli import main

if __name__ == "__main__":  # process-pool workers re-import this module under spawn
    main(prog_name="t2i-fast")
