from t2i_fast.cli import main

main()
