from grounded_diffusion.cli import main

main()
